"""Fine-tuning methods: HOW the model changes. One file per method; ``base.py`` holds the contract."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .adapter_files import method_for_adapter
from .base import (
    Method,
    MethodConfig,
    MethodHandle,
    available_methods,
    get_method,
)


def attach(model: nn.Module, config: MethodConfig) -> MethodHandle:
    """Freeze ``model``, inject the method ``config`` names, and return its handle."""
    return get_method(type(config).method).attach(model, config)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> MethodHandle:
    """Attach the adapter saved in ``adapter_dir`` (tuneforge's or PEFT's files) to ``model``."""
    return method_for_adapter(adapter_dir).load(model, adapter_dir)


__all__ = ["attach", "load_adapter", "method_for_adapter", "get_method", "available_methods", "Method",
           "MethodConfig", "MethodHandle"]
