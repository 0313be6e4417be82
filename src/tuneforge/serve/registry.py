"""The adapters a server holds over its one base model, and how a batch switches to them.

Two kinds, decided by the adapter's files:

* plain LoRA (PEFT's LORA format, bias none: LoRA and QLoRA runs) is stacked into :class:`MultiLoRA`; rows for
  different LoRA adapters and the bare base share one forward. Its batch group is :data:`SHARED`.
* every other method (prompt tuning, P-tuning, prefix tuning / P-tuning v2, bottleneck adapters, AdaLoRA, LoRA
  with trained biases) changes the whole forward, so its requests form their own batches: the adapter is attached
  from weights kept in memory for the batch (``Method.attach_saved`` + ``load_state_dict``, what ``Method.load``
  does from disk) and removed afterwards. Its batch group is its name.

A whole-model directory (full fine-tuning) is not an adapter: serve it as ``--model`` instead. An adapter is
checked before it is served: its config field by field (``r: 0`` is an error naming ``r``, not a ZeroDivisionError
on the first request), and the base it was trained on, by the fingerprint ``generate`` warns with (served, a wrong
base would answer every request wrongly, so it is refused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import typing
from pathlib import Path
from typing import Any, Iterator

import pydantic
import torch
from torch import nn

from ..inference.loading import base_mismatch, is_full_model_dir
from ..methods import method_for_adapter
from ..methods.adapter_files import (
    ADAPTER_CONFIG_NAME,
    read_adapter_config,
    read_adapter_weights,
    read_tuneforge_meta,
)
from ..methods.base import Method, MethodConfig, MethodHandle
from ..options import option_names
from ..inference.multi_lora import MultiLoRA, batchable_lora, read_lora_factors

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

    def __init__(self, model: nn.Module, tokenizer: Any, base_name: str, base_fingerprint: str | None = None):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.base_fingerprint = base_fingerprint  # models.model_fingerprint of the base; None: nothing to compare
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

    def check_name(self, name: str) -> None:
        """ValueError unless ``name`` is a valid, free adapter name."""
        if not NAME_PATTERN.fullmatch(name or ""):
            raise ValueError(f"adapter name {name!r}: use letters, digits and . _ : / - (at most 128 characters)")
        if name == self.base_name or name in self.adapters:
            raise ValueError(f"an adapter or base model named {name!r} is already served")

    def add(self, name: str, path: str | Path) -> Adapter:
        """Load the adapter in ``path`` under ``name``; ValueError / FileNotFoundError name what is wrong."""
        self.check_name(name)
        path = Path(path)
        method, saved = describe_adapter(path)
        self._check_trained_on(path)
        options = (read_tuneforge_meta(path) or {}).get("options", {})
        checked_config(path, method, saved, options, self.model)
        with self.lock:
            if batchable_lora(saved):
                adapter = Adapter(name, str(path), method.name, SHARED)
                self.multi.add(name, read_lora_factors(path, self.model))
            else:
                adapter = Adapter(name, str(path), method.name, name, int(saved.get("num_virtual_tokens") or 0),
                                  method, saved, options, read_adapter_weights(path))
                with self._attached(adapter):  # fail now, not on the first request, when it does not fit the base
                    pass
            self.adapters[name] = adapter
        log.info("serving adapter %s (%s, %s) from %s", name, method.name,
                 "batched with other LoRA adapters" if adapter.group == SHARED else "its own batches", path)
        return adapter

    def _check_trained_on(self, path: Path) -> None:
        """ValueError when the adapter's record names another base than the served one (``generate`` warns)."""
        recorded, current = base_mismatch(path, self.base_fingerprint), self.base_fingerprint
        if recorded is not None:
            raise ValueError(f"{path} was trained on a different base model than the one served (fingerprint "
                             f"{recorded[:15]}, served {current[:15]}): its answers would be wrong; serve it over the "
                             "base it was trained on")

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


def describe_adapter(path: Path) -> tuple[type[Method], dict[str, Any]]:
    """The method that wrote the adapter in ``path`` and its ``adapter_config.json``, without loading anything big:
    what a command checks before it loads the model. FileNotFoundError / ValueError say what is wrong."""
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    if is_full_model_dir(path):
        raise ValueError(f"{path} holds a whole model (full fine-tuning), not an adapter: serve it with --model")
    try:
        return method_for_adapter(path), read_adapter_config(path)
    except KeyError:  # tuneforge's record without its "method" field
        raise ValueError(f"{path}: the adapter's tuneforge record names no method") from None


def checked_config(path: Path, method: type[Method], saved: dict[str, Any], options: dict[str, Any],
                   model: nn.Module) -> MethodConfig:
    """The adapter's config with every field checked as tuneforge checks options: a ValueError naming the file and
    the field, never a TypeError or ZeroDivisionError later."""
    where = path / ADAPTER_CONFIG_NAME
    try:
        config = method.config_from_saved(saved, options, model)
        # The constructor checks values; from_dict also checks each against its annotation (lora_alpha: null).
        method.config_class.from_dict(config.to_dict())
    except KeyError as e:
        raise ValueError(f"{where}: the field {e.args[0]!r} is missing") from None
    except TypeError as e:  # a constructor compared a value of the wrong type: let the annotations name the field
        raise ValueError(f"{where}: {wrong_types(method.config_class, saved) or e}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return config


def wrong_types(config_class: type[MethodConfig], saved: dict[str, Any]) -> str | None:
    """The fields of ``saved`` that do not have their option's type, strictly (``r: "8"`` is not a rank), as
    "field: problem"; None when every field has."""
    hints = typing.get_type_hints(config_class)
    problems = []
    for name in option_names(config_class):
        if name in saved:
            try:
                pydantic.TypeAdapter(hints[name]).validate_python(saved[name], strict=True)
            except pydantic.ValidationError as e:
                problems.append(f"{name}: {e.errors()[0]['msg']}")
    return "; ".join(problems) or None


__all__ = ["Adapter", "AdapterRegistry", "SHARED", "checked_config", "describe_adapter"]
