"""The adapters a server holds over its one base model, and how a batch switches to them.

Two kinds, decided by the adapter's files:

* plain LoRA (PEFT's LORA format, bias none: LoRA and QLoRA runs) is stacked into :class:`MultiLoRA`; rows for
  different LoRA adapters and the bare base share one forward. Its batch group is :data:`SHARED`.
* every other method (prompt tuning, P-tuning, prefix tuning / P-tuning v2, bottleneck adapters, AdaLoRA, LoRA
  with trained biases) changes the whole forward, so its requests form their own batches: the adapter is attached
  from weights kept in memory for the batch (``Method.attach_saved`` + ``load_state_dict``, what ``Method.load``
  does from disk) and removed afterwards. Its batch group is its name.

A whole-model directory (full fine-tuning) is not an adapter: serve it as ``--model`` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..inference import is_full_model_dir
from ..methods import method_for_adapter
from ..methods.adapter_files import read_adapter_config, read_adapter_weights, read_tuneforge_meta
from ..methods.base import Method, MethodHandle
from .multi_lora import MultiLoRA, batchable_lora, read_lora_factors

log = logging.getLogger(__name__)

SHARED = ""  # the batch group of the base and every stacked LoRA adapter
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@dataclasses.dataclass
class Adapter:
    name: str
    path: str
    method: str
    group: str
    """SHARED for stacked LoRA adapters, else the adapter's name (its requests batch only with each other)."""
    reserved_positions: int = 0
    """Positions the adapter takes from the context (a prompt's virtual tokens)."""
    # For per-adapter methods: what Method.load reads from disk, kept in memory for each batch's attach.
    method_class: type[Method] | None = None
    saved: dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    state: dict[str, torch.Tensor] | None = None


class AdapterRegistry:
    """Adapters by name over ``model``. ``lock`` is held by whoever runs the model (the scheduler's worker) and by
    ``add`` / ``remove``, so an adapter never changes under a running batch."""

    def __init__(self, model: nn.Module, tokenizer: Any, base_name: str):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.multi = MultiLoRA(model)
        self.adapters: dict[str, Adapter] = {}
        self.lock = threading.RLock()

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def resolve(self, name: str) -> Adapter | None:
        """The adapter a request's ``model`` names (None: the base); KeyError when nothing has that name."""
        if name == self.base_name:
            return None
        if name not in self.adapters:
            raise KeyError(name)
        return self.adapters[name]

    def add(self, name: str, path: str | Path) -> Adapter:
        """Load the adapter in ``path`` under ``name``; ValueError / FileNotFoundError name what is wrong."""
        if not NAME_PATTERN.fullmatch(name or ""):
            raise ValueError(f"adapter name {name!r}: use letters, digits and . _ : / - (at most 128 characters)")
        if name == self.base_name or name in self.adapters:
            raise ValueError(f"an adapter or base model named {name!r} is already served")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"adapter directory {path} does not exist")
        if is_full_model_dir(path):
            raise ValueError(f"{path} holds a whole model (full fine-tuning), not an adapter: serve it with --model")
        method = method_for_adapter(path)
        saved = read_adapter_config(path)
        with self.lock:
            if batchable_lora(saved):
                adapter = Adapter(name, str(path), method.name, SHARED)
                self.multi.add(name, read_lora_factors(path, self.model))
            else:
                adapter = Adapter(name, str(path), method.name, name, int(saved.get("num_virtual_tokens") or 0),
                                  method, saved, (read_tuneforge_meta(path) or {}).get("options", {}),
                                  read_adapter_weights(path))
                with self._attached(adapter):  # fail now, not on the first request, when it does not fit the base
                    pass
            self.adapters[name] = adapter
        log.info("serving adapter %s (%s, %s) from %s", name, method.name,
                 "batched with other LoRA adapters" if adapter.group == SHARED else "its own batches", path)
        return adapter

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise KeyError(name)
            adapter = self.adapters.pop(name)
            if adapter.group == SHARED:
                self.multi.remove(name)

    @contextlib.contextmanager
    def activate(self, group: str, row_adapters: list[str | None]) -> Iterator[None]:
        """Inside: the model computes batch row i with adapter ``row_adapters[i]`` (None: the base). A batch holds
        one ``group``: SHARED rows (base / stacked LoRA), or rows of one per-adapter method."""
        with self.lock:
            if group == SHARED:
                with self.multi.rows(row_adapters):
                    yield
            else:
                with self._attached(self.adapters[group]):
                    yield

    @contextlib.contextmanager
    def _attached(self, adapter: Adapter) -> Iterator[MethodHandle]:
        cls = adapter.method_class
        config = cls.config_from_saved(adapter.saved, adapter.options, self.model)
        handle = cls.attach_saved(self.model, config, adapter.saved)
        try:
            handle.load_state_dict(adapter.state)
            handle.model.eval()
            yield handle
        finally:
            handle.remove()


__all__ = ["Adapter", "AdapterRegistry", "SHARED"]
