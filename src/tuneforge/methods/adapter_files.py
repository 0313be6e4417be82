"""Adapter directories on disk: what every method writes and reads, in one place.

An adapter directory holds PEFT's two files, ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT and
vLLM load them), plus ``tuneforge_adapter.json``: tuneforge's own record of the method and its options (PEFT drops
keys it does not know from ``adapter_config.json``, so e.g. QLoRA's quantisation options live here). Weights are
safetensors only; nothing is unpickled.

This module imports nothing else from tuneforge at import time, so ``methods/base.py`` can import its names and
every method can read its files without depending on the training-state code in ``tuneforge.run.checkpoint``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from ..models.loading import model_fingerprint, peft_base_path

if TYPE_CHECKING:
    from .base import Method, MethodHandle

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
TUNEFORGE_ADAPTER_META = "tuneforge_adapter.json"
# The key in TUNEFORGE_ADAPTER_META holding models.model_fingerprint() of the base the adapter was trained on.
BASE_FINGERPRINT_KEY = "base_model_fingerprint"
# The base as tuneforge names it (an embedded name, an absolute path, a hub id); adapter_config.json holds a path.
BASE_MODEL_KEY = "base_model"


def jsonable(value: Any) -> Any:
    """``value`` with tuples/sets as lists, tensors as lists and dict keys as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    # PEFT writes indented, sorted JSON with sets as lists.
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_adapter(handle: MethodHandle, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format) and tuneforge's metadata."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = handle.adapter_config()
    base = base_model_name_or_path or getattr(handle.model, "name_or_path", None)
    # PEFT and transformers open this path themselves (AutoPeftModelForCausalLM): an embedded name would send them
    # to the hub, so the embedded model's local folder goes here and its name into tuneforge's own metadata.
    config["base_model_name_or_path"] = peft_base_path(base) if base else base
    write_json(directory / ADAPTER_CONFIG_NAME, config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in handle.state_dict().items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    # PEFT drops keys it does not know from adapter_config.json, so tuneforge's own facts live beside it.
    meta = {"method": type(handle.config).method, "options": jsonable(handle.config.to_dict()), **handle.summary()}
    if base:
        meta[BASE_MODEL_KEY] = base
    fingerprint = model_fingerprint(base_model_name_or_path) if base_model_name_or_path else None
    if fingerprint is not None:  # a local base: loading warns when the "same" path later holds another model
        meta[BASE_FINGERPRINT_KEY] = fingerprint
    write_json(directory / TUNEFORGE_ADAPTER_META, jsonable(meta))
    return directory


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``; FileNotFoundError naming the directory when it is missing."""
    path = Path(directory) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {directory}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated, empty or corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    check_finite(tensors, path)
    return tensors


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{name: how many values are NaN or infinite}`` for the floating-point tensors that hold any."""
    return {name: int((~torch.isfinite(t)).sum()) for name, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())}


def check_finite(tensors: dict[str, torch.Tensor], where: Any) -> None:
    """Refuse weights holding NaN or infinity: loading them would make every output NaN, silently."""
    bad = nonfinite_tensors(tensors)
    if bad:
        first = ", ".join(f"{name} ({count} values)" for name, count in sorted(bad.items())[:3])
        raise ValueError(f"{where}: {len(bad)} tensor(s) hold NaN or infinite values: {first}")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; ValueError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` (PEFT's fields); FileNotFoundError naming the directory when it is missing."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {directory}")
    return read_json_object(path)


def read_tuneforge_meta(directory: str | Path) -> dict[str, Any] | None:
    """tuneforge's record (``{"method": ..., "options": {...}, ...summary}``), or None for an adapter PEFT wrote."""
    path = Path(directory) / TUNEFORGE_ADAPTER_META
    if not path.is_file():
        return None
    return read_json_object(path)


def is_adapter_dir(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG_NAME).is_file()


def method_for_adapter(adapter_dir: str | Path) -> type[Method]:
    """The method that wrote ``adapter_dir``: tuneforge's own record first, then PEFT's ``peft_type``."""
    from .base import METHODS

    data = read_adapter_config(adapter_dir)
    meta = read_tuneforge_meta(adapter_dir)
    if meta is not None:
        return METHODS.get(meta["method"])
    peft_type = data.get("peft_type")
    # The class that declares the peft_type owns PEFT's files; a subclass that merely inherits it (P-Tuning v2 is
    # prefix tuning with other defaults) does not, whatever order the registry lists them in.
    for cls in METHODS.classes():
        if peft_type is not None and vars(cls).get("peft_type") == peft_type:
            return cls
    raise ValueError(f"{Path(adapter_dir) / ADAPTER_CONFIG_NAME}: peft_type {peft_type!r} is not supported by "
                     "tuneforge")


__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "TUNEFORGE_ADAPTER_META", "BASE_FINGERPRINT_KEY", "jsonable",
           "write_json",
           "save_adapter", "read_adapter_weights", "read_adapter_config", "read_tuneforge_meta", "is_adapter_dir",
           "method_for_adapter"]
