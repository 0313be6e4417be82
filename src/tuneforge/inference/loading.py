"""Load a base model plus a saved adapter for inference: the one loader behind generate, eval, merge, prompt
evaluation, the local synth teacher and reward scoring.

The adapter's method decides how its base model loads (``Method.model_load_kwargs`` with the options tuneforge
recorded beside the adapter, see ``read_tuneforge_meta``): a QLoRA adapter gets its base straight in 4 bits with
the quantisation it was trained with, so what is served is what was trained. A directory holding a whole model
(full fine-tuning) is loaded as the model itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..data.template import ensure_chat_template
from ..methods import load_adapter
from ..methods.adapter_files import (
    ADAPTER_CONFIG_NAME,
    BASE_FINGERPRINT_KEY,
    BASE_MODEL_KEY,
    TUNEFORGE_ADAPTER_META,
    is_adapter_dir,
    method_for_adapter,
    read_tuneforge_meta,
)
from ..methods.base import MethodHandle
from ..models.loading import DEFAULT_MODEL, load_model, model_fingerprint

log = logging.getLogger(__name__)

RUN_CONFIG_NAME = "tuneforge.yaml"


def recorded_base_model(adapter: str | Path) -> str | None:
    """The base model a run / adapter directory names: ``tuneforge.yaml``'s ``model``, else tuneforge's adapter
    metadata (the name it was given, e.g. an embedded one), else ``adapter_config.json``'s ``base_model_name_or_path``
    (a path PEFT can open); None when none names one."""
    for name, key in ((RUN_CONFIG_NAME, "model"), (TUNEFORGE_ADAPTER_META, BASE_MODEL_KEY),
                      (ADAPTER_CONFIG_NAME, "base_model_name_or_path")):
        path = Path(adapter) / name
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())  # JSON is YAML
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                                 f"({' '.join(str(e).split())})") from None
            base = data.get(key) if isinstance(data, dict) else None
            if base:
                return str(base)
    return None


def default_model(adapter: str | Path | None, model: str | None) -> str:
    """The base model to load: ``model`` (--model) if given, else the one the adapter directory records (its
    ``tuneforge.yaml``, then its ``adapter_config.json``), else the embedded default."""
    if model:
        return model
    return (recorded_base_model(adapter) if adapter else None) or DEFAULT_MODEL


def recorded_model_fingerprint(adapter: str | Path) -> str | None:
    """The base model fingerprint the adapter's tuneforge record holds; None for PEFT's files or older records."""
    meta = read_tuneforge_meta(adapter)
    value = meta.get(BASE_FINGERPRINT_KEY) if meta else None
    return value if isinstance(value, str) else None


def base_mismatch(adapter: str | Path, current: str | None) -> str | None:
    """The adapter's recorded base fingerprint when ``current`` (the base at hand's) is another model; None when
    they agree or cannot be compared (PEFT's files, a hub base with nothing local to hash, fingerprints of two
    scheme versions). `generate` warns on a mismatch; `serve` refuses."""
    recorded = recorded_model_fingerprint(adapter)
    if recorded is None or current is None or current.split(":")[0] != recorded.split(":")[0]:
        return None
    return recorded if recorded != current else None


def check_base_model(adapter: str | Path, model_name: str) -> bool:
    """Warn when ``model_name`` is not the base ``adapter`` was trained on (their fingerprints differ): the same
    name can mean another model (a hub id, a folder that was replaced). True when it warned."""
    if recorded_model_fingerprint(adapter) is None:  # nothing to compare: do not hash the base
        return False
    current = model_fingerprint(model_name)
    recorded = base_mismatch(adapter, current)
    if recorded is None:
        return False
    log.warning("%s was trained on a different base model than %s (fingerprint %s, this one %s): its outputs "
                "will be wrong; pass --model with the base it was trained on", adapter, model_name,
                recorded[:15], current[:15])
    return True


def training_dtype(run: str | Path | None, device: str | torch.device | None) -> str | None:
    """The dtype the run's base computed in while it trained (run.json), when ``device`` is of the same kind: the
    same question (exact match on held-out data) then gets the same answer as training reported."""
    if run is None or not (Path(run) / "run.json").is_file():
        return None
    try:
        precision = json.loads((Path(run) / "run.json").read_text()).get("precision") or {}
    except (OSError, ValueError):
        return None
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return precision.get("dtype") if precision.get("device") == kind else None


def is_full_model_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (full fine-tuning saves one) rather than an adapter."""
    return (Path(path) / "config.json").is_file() and not is_adapter_dir(path)


def model_load_kwargs(adapter: str | Path) -> dict[str, Any]:
    """What the adapter's method needs ``load_model`` to do for its base (QLoRA: a 4-bit quantization_config)."""
    meta = read_tuneforge_meta(adapter)
    if meta is None:  # PEFT's files: plain LoRA-family adapters on a float base
        return {}
    return method_for_adapter(adapter).model_load_kwargs(meta.get("options", {}))


def load_for_inference(model_name: str, adapter: str | Path | None, device: str | torch.device | None = None,
                       dtype: torch.dtype | str | None = None) -> tuple[nn.Module, Any, MethodHandle | None]:
    """``(model, tokenizer, handle)``: ``model_name`` loaded the way the adapter's method asks, the adapter attached
    (``handle`` is None without one), a chat template ensured, eval mode.

    ``adapter`` may also be a whole model directory (full fine-tuning): that model is loaded instead of
    ``model_name`` and ``handle`` is None.
    """
    kwargs: dict[str, Any] = {}
    if adapter and is_full_model_dir(adapter):
        if model_name != str(adapter):
            log.info("%s holds a whole model (full fine-tuning): loading it instead of %s", adapter, model_name)
        model_name, adapter = str(adapter), None
    elif adapter:
        kwargs = model_load_kwargs(adapter)
    model, tokenizer = load_model(model_name, device=device, dtype=dtype, **kwargs)
    if adapter:
        check_base_model(adapter, model_name)
    ensure_chat_template(tokenizer)
    handle = load_adapter(model, adapter) if adapter else None
    model.eval()
    return model, tokenizer, handle


__all__ = ["default_model", "load_for_inference", "training_dtype", "base_mismatch", "recorded_base_model",
           "recorded_model_fingerprint", "check_base_model", "model_load_kwargs", "is_full_model_dir"]
