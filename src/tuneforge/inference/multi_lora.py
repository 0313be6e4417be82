"""Many LoRA adapters in one forward: each batch row adds its own adapter's update (S-LoRA / Punica's BGMV).

For every linear layer some adapter targets, the adapters' factors are stacked, ``A: [slots, r_max, in]`` and
``B: [slots, out, r_max]``, with slot 0 all zeros (the bare base) and smaller ranks zero-padded to ``r_max`` (the
padding adds exact zeros). A forward gathers each row's factors by the batch's slot tensor and adds
``(x_row @ A_row^T) @ B_row^T * scaling_row`` to the frozen layer's output, which is ``LoRALinear.forward`` per row.

The update is added by a forward hook on the base layer rather than by wrapping it: module names stay the base
model's, so an adapter that cannot share a batch (prompt / prefix / bottleneck / AdaLoRA, see ``registry.py``) can
still be attached under its saved key names while these hooks sit idle (every row in slot 0).

Only adapters in PEFT's plain LoRA format qualify (:func:`read_lora_factors`): ΔW = B A · scaling per layer and
nothing else. Trained biases, DoRA or per-module rank / alpha patterns change more than that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..methods.adapter_files import read_adapter_config, read_adapter_weights
from ..methods.base import PEFT_PREFIX, in_out_features, linear_like


@dataclasses.dataclass
class LoRAFactors:
    """One adapter's factors per layer: module name -> (A ``[r, in]``, B ``[out, r]``), and its scaling."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float


def batchable_lora(saved: dict[str, Any]) -> bool:
    """True when an ``adapter_config.json`` describes a plain LoRA update that per-row selection reproduces."""
    return (saved.get("peft_type") == "LORA" and saved.get("bias", "none") == "none" and not saved.get("use_dora")
            and not saved.get("rank_pattern") and not saved.get("alpha_pattern")
            and not saved.get("modules_to_save"))


def read_lora_factors(adapter_dir: str | Path, model: nn.Module) -> LoRAFactors:
    """The LoRA factors saved in ``adapter_dir``, checked against ``model``'s layers (names and shapes)."""
    saved = read_adapter_config(adapter_dir)
    if not batchable_lora(saved):
        raise ValueError(f"{adapter_dir}: not a plain LoRA adapter (peft_type LORA, bias none, no DoRA / patterns)")
    r = int(saved["r"])
    scaling = float(saved["lora_alpha"]) / (math.sqrt(r) if saved.get("use_rslora") else r)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_adapter_weights(adapter_dir).items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise KeyError(f"{adapter_dir}: unexpected tensor {key!r} in a LoRA adapter")
    modules = {}
    for name, pair in sorted(pairs.items()):
        modules[name] = _checked_pair(adapter_dir, model, name, pair)
    if not modules:
        raise ValueError(f"{adapter_dir}: the LoRA adapter holds no lora_A / lora_B tensors")
    return LoRAFactors(modules, scaling)


def _checked_pair(adapter_dir, model: nn.Module, name: str, pair: dict[str, torch.Tensor]):
    if set(pair) != {"lora_A", "lora_B"}:
        raise KeyError(f"{adapter_dir}: layer {name} has {sorted(pair)} but needs both lora_A and lora_B")
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"{adapter_dir}: the adapter targets {name}, which this base model does not have") from None
    if not linear_like(layer):
        raise ValueError(f"{adapter_dir}: {name} is a {type(layer).__name__}, not a linear layer")
    in_features, out_features = in_out_features(layer)
    a, b = pair["lora_A"], pair["lora_B"]
    if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
        raise ValueError(f"{adapter_dir}: {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                         f"{in_features} -> {out_features} layer")
    return a, b


class MultiLoRA:
    """The stacked factors of every loaded LoRA adapter and the hooks that apply them per row."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, LoRAFactors] = {}
        self.slot: dict[str, int] = {}
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scaling = torch.zeros(1)
        self._hooks: list[RemovableHandle] = []
        self._rows: torch.Tensor | None = None  # the slot of each batch row while a forward runs

    def add(self, name: str, factors: LoRAFactors) -> None:
        self.adapters[name] = factors
        self._rebuild()

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self._rebuild()

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Inside: batch row i uses adapter ``names[i]`` (None: the bare base)."""
        slots = [self.slot[n] if n is not None else 0 for n in names]
        device = next(self.model.parameters()).device
        # No row with an adapter: the hooks stay idle and the base's outputs pass through untouched.
        self._rows = torch.tensor(slots, device=device) if any(slots) else None
        try:
            yield
        finally:
            self._rows = None

    def _rebuild(self) -> None:
        """Restack every adapter (slots 1..N in insertion order) and re-hook exactly the layers they target."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._stacks = [], {}
        self.slot = {name: i + 1 for i, name in enumerate(self.adapters)}
        targets = sorted({m for f in self.adapters.values() for m in f.modules})
        for module_name in targets:
            layer = self.model.get_submodule(module_name)
            self._stacks[module_name] = self._stack(module_name, layer)
            self._hooks.append(layer.register_forward_hook(self._hook(module_name)))
        weight = next(self.model.parameters())
        self._scaling = torch.tensor([0.0] + [f.scaling for f in self.adapters.values()], device=weight.device,
                                     dtype=weight.dtype if weight.dtype.is_floating_point else torch.float32)

    def _stack(self, module_name: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        in_features, out_features = in_out_features(layer)
        pairs = [f.modules.get(module_name) for f in self.adapters.values()]
        r_max = max(p[0].shape[0] for p in pairs if p is not None)
        weight = layer.weight
        # A quantised base computes in its compute dtype; the factors follow it, as LoRALinear's do.
        dtype = weight.dtype if weight.dtype.is_floating_point else getattr(layer, "compute_dtype", torch.float32)
        a = torch.zeros(len(pairs) + 1, r_max, in_features, dtype=dtype, device=weight.device)
        b = torch.zeros(len(pairs) + 1, out_features, r_max, dtype=dtype, device=weight.device)
        for slot, pair in enumerate(pairs, start=1):
            if pair is not None:
                r = pair[0].shape[0]
                a[slot, :r] = pair[0]
                b[slot, :, :r] = pair[1]
        return a, b

    def _hook(self, module_name: str):
        def add_updates(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            rows = self._rows
            if rows is None:
                return output
            a, b = self._stacks[module_name]
            x = args[0].to(a.dtype)
            flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, in]
            hidden = torch.bmm(flat, a.index_select(0, rows).transpose(1, 2))  # [batch, tokens, r_max]
            update = torch.bmm(hidden, b.index_select(0, rows).transpose(1, 2))  # [batch, tokens, out]
            update = update * self._scaling.index_select(0, rows).to(update.dtype)[:, None, None]
            return output + update.reshape(output.shape).to(output.dtype)

        return add_updates


__all__ = ["LoRAFactors", "MultiLoRA", "batchable_lora", "read_lora_factors"]
