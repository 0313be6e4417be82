"""AdaLoRA: LoRA whose rank budget moves to the layers that need it (Zhang et al. 2023, arXiv:2303.10512).

Each adapted layer adds ΔW = P Λ Q in SVD form — PEFT's names: ``lora_B`` = P [out, r], ``lora_E`` = the diagonal
Λ [r, 1], ``lora_A`` = Q [r, in] — computed as PEFT does:

    h = W x + (dropout(x) @ (A * E)ᵀ @ Bᵀ) · lora_alpha / (init_r + 1e-5)

Training adds an orthogonality regulariser on P and Q, scores each singular "triplet" (P column, λ, Q row) by the
smoothed sensitivity |w·∇w| times its uncertainty, and shrinks the total budget from ``init_r`` per layer to
``target_r`` per layer with a cubic schedule, zeroing the λ of the least important triplets (paper §3;
PEFT's ``RankAllocator``). A pruned triplet keeps its P and Q rows, as in PEFT, so a triplet can win its λ back at a
later re-allocation. The final ranks are saved as PEFT's ``rank_pattern`` and the saved tensors keep only the
surviving triplets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .base import (
    PEFT_PREFIX,
    Method,
    MethodConfig,
    MethodHandle,
    Switchable,
    cast_model,
    check_rank,
    find_target_modules,
    freeze,
    in_out_features,
    register,
    replace_module,
    wrap_modules,
)
from .lora import MergeableDelta, is_packed, peft_target_modules

FACTORS = ("lora_A", "lora_E", "lora_B")


@dataclasses.dataclass
class AdaLoRAConfig(MethodConfig):
    """Options of AdaLoRA (names as in the paper and PEFT's AdaLoraConfig)."""

    init_r: int = 12
    """Rank every adapted layer starts with; the budget is then pruned towards target_r."""
    target_r: int = 8
    """Average rank per layer left at the end: the final budget is target_r x number of adapted layers."""
    lora_alpha: float = 8
    """The update is scaled by lora_alpha / init_r (PEFT's formula), a constant while ranks are pruned."""
    lora_dropout: float = 0.0
    """Dropout on the adapter branch's input only; the frozen path never sees it."""
    target_modules: str | list[str] = "all-linear"
    """Layers to adapt, as for LoRA: "all-linear", a list of name suffixes, or one regular expression."""
    tinit: int = 0
    """Warm-up steps at the full budget before any pruning, so importance scores mean something first."""
    tfinal: int = 0
    """Final steps at the target budget with the rank pattern frozen: the surviving triplets fine-tune."""
    deltaT: int = 1
    """Re-allocate the budget (re-mask triplets) every deltaT steps during the cubic decrease."""
    beta1: float = 0.85
    """EMA coefficient smoothing the sensitivity |w·∇w| of every adapter weight (paper §3.3)."""
    beta2: float = 0.85
    """EMA coefficient smoothing the uncertainty |sensitivity - its EMA| (paper §3.3)."""
    orth_reg_weight: float = 0.5
    """Weight of the regulariser that keeps P and Q orthogonal, so λ stays a meaningful singular value."""
    total_step: int | None = None
    """Optimiser steps the schedule spans; unset: the trainer fills in the run's length."""

    def __post_init__(self):
        if self.init_r < 1 or not 0 <= self.target_r <= self.init_r:
            raise ValueError(f"adalora needs init_r >= 1 and 0 <= target_r <= init_r, got init_r={self.init_r}, "
                             f"target_r={self.target_r}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"adalora beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"adalora orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.deltaT < 1 or self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"adalora needs deltaT >= 1 and tinit, tfinal >= 0, got deltaT={self.deltaT}, "
                             f"tinit={self.tinit}, tfinal={self.tfinal}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.total_step is not None:
            check_schedule(self, self.total_step)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdaLoRAConfig":
        # A flag --adalora-delta-t arrives as "delta_t"; the field keeps PEFT's spelling "deltaT".
        values = {("deltaT" if k.lower().replace("_", "") == "deltat" else k): v for k, v in values.items()}
        return super().from_dict(values)


def check_schedule(config: AdaLoRAConfig, total_step: int) -> None:
    if total_step <= 0 or config.tinit >= total_step - config.tfinal:
        raise ValueError(f"adalora schedule leaves no budgeting phase: tinit={config.tinit}, tfinal={config.tfinal}, "
                         f"total_step={total_step} (need tinit < total_step - tfinal)")


class SVDLinear(MergeableDelta, nn.Module, Switchable):
    """``base_layer(x) + (dropout(x) @ (A*E)ᵀ @ Bᵀ) * scaling / (ranknum + 1e-5)`` (PEFT's SVDLinear)."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        weight = base_layer.weight
        dtype = getattr(base_layer, "compute_dtype", None) if is_packed(weight) else weight.dtype
        factory = dict(device=weight.device, dtype=dtype or torch.float32)
        # E = 0 makes the adapter start at the base model's outputs; A and B ~ N(0, 0.02) as in PEFT.
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory).normal_(0.0, 0.02))
        # The divisor stays init_r while triplets are pruned (PEFT keeps it when resizing), so pruning never
        # rescales the survivors. A frozen parameter, as in PEFT, so parameter totals agree.
        self.ranknum = nn.Parameter(torch.full((1,), float(r), **factory), requires_grad=False)
        self.scaling = lora_alpha if lora_alpha > 0 else float(r)  # PEFT: alpha, or r when alpha <= 0
        self.merged = False

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.adapter_enabled:
            if self.merged:
                raise RuntimeError("cannot disable a merged AdaLoRA layer; unmerge() first")
            return result
        if self.merged:
            return result
        x = x.to(self.lora_A.dtype)
        update = (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling
        return (result + update / (self.ranknum + 1e-5)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B (A·E) · scaling / ranknum in the base layer's layout ([out, in], or [in, out] for Conv1D)."""
        delta = self.lora_B @ (self.lora_A * self.lora_E)
        delta = (delta.T if self.fan_in_fan_out else delta) * self.scaling / (self.ranknum + 1e-5)
        return delta

    @torch.no_grad()
    def resize_(self, keep: torch.Tensor) -> None:
        """Keep only the triplets where ``keep`` is True (PEFT's resize_modules_by_rank_pattern); ranknum stays."""
        for name in FACTORS:
            old = getattr(self, name)
            new = old[:, keep] if name == "lora_B" else old[keep]
            setattr(self, name, nn.Parameter(new.clone(), requires_grad=old.requires_grad))

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class RankAllocator:
    """Importance of each triplet and the budget over time (paper §3.2-3.3; PEFT's RankAllocator, same arithmetic).

    Per adapter weight w: sensitivity I = |w·∇w|, smoothed Ī ← β1 Ī + (1-β1) I, uncertainty Ū ← β2 Ū + (1-β2)|I - Ī|,
    score s = Ī·Ū. A triplet's importance is s(λ) + mean of s over its Q row + mean of s over its P column.
    """

    def __init__(self, layers: dict[str, SVDLinear], config: AdaLoRAConfig):
        self.layers = layers
        self.config = config
        self.init_bgt = sum(layer.r for layer in layers.values())
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int, total_step: int) -> tuple[int, bool]:
        """(total rank budget, whether to re-mask) at 0-based step ``step``: cubic decrease (paper §3.4)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, grads: dict[tuple[str, str], torch.Tensor]) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for key, grad in grads.items():
            weight = getattr(self.layers[key[0]], key[1])
            ipt = (weight * grad).abs().float()
            avg = self.exp_avg_ipt.get(key, torch.zeros_like(ipt))
            unc = self.exp_avg_unc.get(key, torch.zeros_like(ipt))
            self.exp_avg_ipt[key] = b1 * avg + (1 - b1) * ipt
            self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        scores = {}
        for name in self.layers:
            s = {f: self.exp_avg_ipt[(name, f)] * self.exp_avg_unc[(name, f)] for f in FACTORS}
            scores[name] = s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero λ of every triplet scoring at or below the (init_bgt - budget)-th lowest score (PEFT's ``<=``)."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item() if k > 0 else -math.inf
        pattern = {}
        for name, layer in self.layers.items():
            pruned = scores[name] <= threshold
            layer.lora_E.masked_fill_(pruned.view(-1, 1), 0.0)
            pattern[f"{name}.lora_E"] = (~pruned).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for name, layer in self.layers.items():
            keep = pattern.get(f"{name}.lora_E")
            if keep is not None and len(keep) == layer.r:
                layer.lora_E.masked_fill_(~torch.tensor(keep, device=layer.lora_E.device).view(-1, 1), 0.0)


class AdaLoRAHandle(MethodHandle):
    config: AdaLoRAConfig

    def __init__(self, model: nn.Module, config: AdaLoRAConfig, module_names: list[str], target_modules):
        super().__init__(model, config)
        self.module_names = module_names
        self.target_modules = target_modules  # PEFT's target_modules for these layers, fixed before wrapping
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.allocator: RankAllocator | None = None
        self._total_steps: int | None = None
        self._grads: dict[tuple[str, str], torch.Tensor] = {}

    def layers(self) -> dict[str, SVDLinear]:
        return {n: self.model.get_submodule(n) for n in self.module_names}

    # -- the schedule's length ----------------------------------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        """``config.total_step`` when set, else what the trainer assigned (the run's optimiser steps)."""
        return self.config.total_step or self._total_steps

    @total_steps.setter
    def total_steps(self, value: int) -> None:
        if self.config.total_step is None:  # an explicit total_step wins; only the run length used is checked
            check_schedule(self.config, value)
        self._total_steps = value

    def begin_training(self, total_steps: int) -> None:
        self.total_steps = total_steps

    # -- training hooks -------------------------------------------------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        """orth_reg_weight · mean over every P and Q of ‖PᵀP − I‖_F / ‖QQᵀ − I‖_F — PEFT's form of the paper's
        R(P, Q): the plain Frobenius norm, not its square, averaged over the 2 x layers matrices."""
        if self.config.orth_reg_weight == 0:
            return None
        total, count = 0, 0
        for layer in self.layers().values():
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(*cov.shape, out=torch.empty_like(cov))
                total = total + torch.norm(cov - eye, p="fro")
                count += 1
        return self.config.orth_reg_weight * (total / count)

    def after_backward(self, step: int) -> None:
        # Keep the gradients in case the trainer zeroes them (set_to_none) before after_step.
        self._grads = {(n, f): getattr(layer, f).grad for n, layer in self.layers().items() for f in FACTORS}
        total = self.total_steps
        if self.rank_pattern is None and total is not None and step > total - self.config.tfinal:
            # Resumed inside the final phase without training_state: the checkpoint holds the pruned λ as
            # zeros, and the optimiser has not touched them yet.
            self.rank_pattern = {f"{n}.lora_E": (layer.lora_E.view(-1) != 0).tolist()
                                 for n, layer in self.layers().items()}

    def after_step(self, step: int) -> None:
        """Importance update and budget re-allocation, after the optimiser step as PEFT's ``update_and_allocate``.

        ``step`` is the 0-based index of the optimiser step just taken (the trainer's, and PEFT's ``global_step``).
        """
        self.update_and_allocate(step)

    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate at 0-based ``global_step``."""
        total = self.total_steps
        if total is None:
            raise RuntimeError("AdaLoRA needs the run length: set total_step in its options, or handle.total_steps")
        if self.allocator is None:
            self.allocator = RankAllocator(self.layers(), self.config)
        allocator, final = self.allocator, total - self.config.tfinal
        if global_step < final:
            allocator.update_ipt(self._current_grads())
            budget, mask = allocator.budget_schedule(global_step, total)
            if mask:
                self.rank_pattern = allocator.mask_to_budget(budget)
        elif global_step == final:  # the budget is final: mask once more, then keep the pattern fixed
            budget, _ = allocator.budget_schedule(global_step, total)
            self.rank_pattern = allocator.mask_to_budget(budget)
            allocator.reset_ipt()
        elif self.rank_pattern is not None:
            allocator.mask_using_rank_pattern(self.rank_pattern)
        self._grads = {}

    def training_state(self) -> dict[str, torch.Tensor]:
        """What an exact resume needs beyond the trainable tensors: the importance EMAs and the rank pattern."""
        state = {}
        for (name, f), avg in (self.allocator.exp_avg_ipt.items() if self.allocator else ()):
            state[f"ipt:{name}.{f}"] = avg
            state[f"unc:{name}.{f}"] = self.allocator.exp_avg_unc[(name, f)]
        for key, keep in (self.rank_pattern or {}).items():
            state[f"pattern:{key}"] = torch.tensor(keep, dtype=torch.uint8)
        return state

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.allocator = RankAllocator(self.layers(), self.config)
        pattern = {}
        for key, value in state.items():
            kind, _, rest = key.partition(":")
            if kind == "pattern":
                pattern[rest] = value.bool().tolist()
            else:
                name, _, f = rest.rpartition(".")
                target = self.allocator.exp_avg_ipt if kind == "ipt" else self.allocator.exp_avg_unc
                target[(name, f)] = value.to(getattr(self.layers()[name], f).device)
        self.rank_pattern = pattern or None

    def _current_grads(self) -> dict[tuple[str, str], torch.Tensor]:
        grads = {}
        for name, layer in self.layers().items():
            for f in FACTORS:
                grad = getattr(layer, f).grad
                grad = grad if grad is not None else self._grads.get((name, f))
                if grad is None:
                    raise RuntimeError(f"AdaLoRA found no gradient for {name}.{f}: call after_backward before "
                                       "zeroing gradients, or after_step before zero_grad")
                grads[(name, f)] = grad
        return grads

    # -- ranks ------------------------------------------------------------------------------------------------
    def final_ranks(self) -> dict[str, int]:
        pattern = self.rank_pattern or {}
        return {n: sum(pattern[f"{n}.lora_E"]) if f"{n}.lora_E" in pattern else layer.r
                for n, layer in self.layers().items()}

    def summary(self) -> dict[str, Any]:
        return {"rank_pattern": self.rank_pattern, "final_ranks": self.final_ranks()}

    def resize_by_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """Cut each layer to its kept triplets (loading a saved adapter, whose tensors are already cut)."""
        pattern = {k.removesuffix(".default"): v for k, v in pattern.items()}
        layers = self.layers()
        for key, keep in pattern.items():
            name = key.removesuffix(".lora_E")
            if name not in layers:
                raise KeyError(f"rank_pattern names {key!r}, which is not an adapted layer")
            layers[name].resize_(torch.tensor(keep, dtype=torch.bool, device=layers[name].lora_A.device))
        self.rank_pattern = pattern
        self.allocator = None  # budgets are counted from the current sizes when training goes on

    def _kept(self, name: str, layer: SVDLinear) -> torch.Tensor | None:
        keep = (self.rank_pattern or {}).get(f"{name}.lora_E")
        if keep is None or sum(keep) == layer.r:
            return None  # nothing pruned, or the layer is already cut to its pattern
        if len(keep) != layer.r:
            raise ValueError(f"{name}: rank pattern of length {len(keep)} does not fit rank {layer.r}")
        return torch.tensor(keep, dtype=torch.bool, device=layer.lora_A.device)

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """A, E, B of each layer cut to the kept triplets, under PEFT's keys (plain parameters: no ``.weight``)."""
        out = {}
        for name, layer in self.layers().items():
            keep = self._kept(name, layer)
            for f in FACTORS:
                tensor = getattr(layer, f).detach()
                if keep is not None:
                    tensor = tensor[:, keep] if f == "lora_B" else tensor[keep]
                out[f"{PEFT_PREFIX}{name}.{f}"] = tensor
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        layers = self.layers()
        expected = {f"{PEFT_PREFIX}{n}.{f}": (layer, f) for n, layer in layers.items() for f in FACTORS}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"adapter weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for key, (layer, f) in expected.items():
                target = getattr(layer, f)
                if target.shape != state[key].shape:
                    raise ValueError(f"{key}: saved shape {tuple(state[key].shape)} != model {tuple(target.shape)}")
                target.copy_(state[key])

    def adapter_config(self) -> dict[str, Any]:
        c = self.config
        # PEFT refuses a config without a positive total_step that leaves a budgeting phase; before the run
        # length is known, write the smallest such value (inference never reads it).
        total = self.total_steps or c.tinit + c.tfinal + 1
        return {
            "peft_type": "ADALORA",
            "task_type": "CAUSAL_LM",
            "init_r": c.init_r,
            "target_r": c.target_r,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "target_modules": self.target_modules,
            "tinit": c.tinit,
            "tfinal": c.tfinal,
            "deltaT": c.deltaT,
            "beta1": c.beta1,
            "beta2": c.beta2,
            "orth_reg_weight": c.orth_reg_weight,
            "total_step": total,
            "rank_pattern": self.rank_pattern,
            "fan_in_fan_out": any(layer.fan_in_fan_out for layer in self.layers().values()),
            "bias": "none",
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    # -- merging ------------------------------------------------------------------------------------------------
    def merge(self) -> None:
        for layer in self.layers().values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers().values():
            layer.unmerge()

    def merge_and_unload(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        """Fold every update into its base layer and put the plain layers back: a standard HF model again."""
        self.merge()
        return cast_model(self.remove(), dtype)

    def remove(self) -> nn.Module:
        for name, layer in self.layers().items():
            replace_module(self.model, name, layer.base_layer)
        self.module_names = []
        return self.model


def config_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    """AdaLoRAConfig options from a PEFT ``adapter_config.json``."""
    if data.get("bias", "none") != "none":
        raise ValueError("AdaLoRA adapters with trainable biases are not supported by tuneforge")
    names = [f.name for f in dataclasses.fields(AdaLoRAConfig)]
    return {k: data[k] for k in names if k in data}


@register
class AdaLoRA(Method):
    name = "adalora"
    aliases = ("ada_lora",)
    config_class = AdaLoRAConfig
    peft_type = "ADALORA"

    @classmethod
    def attach(cls, model: nn.Module, config: AdaLoRAConfig) -> AdaLoRAHandle:
        freeze(model)
        names = find_target_modules(model, config.target_modules)
        check_rank(model, names, config.init_r, "init_r")
        target_modules = peft_target_modules(model, names)
        wrap_modules(model, names, lambda _, m: SVDLinear(m, config.init_r, config.lora_alpha, config.lora_dropout))
        for name in names:
            layer = model.get_submodule(name)
            for f in FACTORS:
                getattr(layer, f).requires_grad_(True)
        return AdaLoRAHandle(model, config, names, target_modules)

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module) -> AdaLoRAConfig:
        return AdaLoRAConfig(**config_from_peft(saved))

    @classmethod
    def attach_saved(cls, model: nn.Module, config: AdaLoRAConfig, saved: dict[str, Any]) -> AdaLoRAHandle:
        handle = cls.attach(model, config)
        if saved.get("rank_pattern"):  # the ranks pruning left: the saved factors have those shapes
            handle.resize_by_rank_pattern(saved["rank_pattern"])
        return handle
