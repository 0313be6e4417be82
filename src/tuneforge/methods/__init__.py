"""Fine-tuning methods: HOW the model changes. One file per method; ``base.py`` holds the contract."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .base import (
    ADAPTER_CONFIG_NAME,
    Method,
    MethodConfig,
    MethodHandle,
    available_methods,
    get_method,
)


def attach(model: nn.Module, config: MethodConfig) -> MethodHandle:
    """Freeze ``model``, inject the method ``config`` names, and return its handle."""
    return get_method(type(config).method).attach(model, config)


def method_for_adapter(adapter_dir: str | Path) -> type[Method]:
    """The method that wrote ``adapter_dir``: tuneforge's own record first, then PEFT's ``peft_type``."""
    from . import _load_all  # noqa: F401
    from .base import _REGISTRY

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {adapter_dir}")
    data = json.loads(config_path.read_text())
    meta_path = adapter_dir / "tuneforge_adapter.json"
    if meta_path.is_file():
        return get_method(json.loads(meta_path.read_text())["method"])
    peft_type = data.get("peft_type")
    for cls in _REGISTRY.values():
        if getattr(cls, "peft_type", None) == peft_type:
            return cls
    raise ValueError(f"{config_path}: peft_type {peft_type!r} is not supported by tuneforge")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> MethodHandle:
    """Attach the adapter saved in ``adapter_dir`` (tuneforge's or PEFT's files) to ``model``."""
    return method_for_adapter(adapter_dir).load(model, adapter_dir)


__all__ = ["attach", "load_adapter", "method_for_adapter", "get_method", "available_methods", "Method",
           "MethodConfig", "MethodHandle"]
