"""LoRA: low-rank updates beside frozen linear layers (Hu et al. 2021, arXiv:2106.09685).

Each targeted layer computes ``W x + (B A dropout(x)) · scale`` with ``A: [r, in]`` random and ``B: [out, r]``
zero, so training starts from the base model's exact outputs. ΔW = B A is never materialised while training;
``merge()`` folds it into W for inference.

The wrapper keeps the original layer as ``base_layer`` and names its factors ``lora_A`` / ``lora_B``, so the
model's own state-dict keys are PEFT's saved keys (PEFT only adds ``base_model.model.`` in front).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .base import (
    Method,
    MethodConfig,
    MethodHandle,
    Switchable,
    cast_model,
    find_target_modules,
    freeze,
    in_out_features,
    linear_like,
    register,
    replace_module,
    wrap_modules,
)


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    """Options of LoRA (names as in the paper and PEFT)."""

    method: ClassVar[str] = "lora"

    r: int = 8
    """Rank of the update. Capacity grows with r; 8–64 covers most tasks."""
    lora_alpha: float = 16
    """The update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA), so r can change without retuning the LR."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input only; the frozen path never sees it."""
    target_modules: str | list[str] = "all-linear"
    """Layers to adapt: "all-linear" (every linear layer except the output head), a list of names matched as
    name suffixes (["q_proj", "v_proj"]), or one regular expression matched against full module names."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train too: none; every bias in the model; or only the biases of the adapted layers."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023): keeps the update's size stable at large r."""
    init_lora_weights: bool | Literal["gaussian"] = True
    """True: A Kaiming-uniform, B zero (start at the base model). "gaussian": A ~ N(0, 1/r). False: B random too
    (only useful for tests that need a non-trivial adapter)."""

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"lora r must be positive, got {self.r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"lora bias must be none, all or lora_only, got {self.bias!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def is_packed(weight: torch.Tensor) -> bool:
    """True for quantised weights (bitsandbytes 4/8-bit), whatever dtype their packed storage has."""
    return type(weight).__name__ in {"Params4bit", "Int8Params"} or not weight.dtype.is_floating_point


class MergeableDelta:
    """Folds a layer's ``delta_weight()`` into ``base_layer.weight`` and back (LoRA and AdaLoRA layers)."""

    merged: bool = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        if is_packed(weight):
            raise RuntimeError("a quantised base cannot be merged in place; use `tuneforge merge` (it dequantises)")
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False


class LoRALinear(MergeableDelta, nn.Module, Switchable):
    """``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`` around an nn.Linear, bnb Linear4bit or Conv1D."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool = False,
                 init: bool | str = True):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = in_out_features(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        # A 4-bit base stores packed weights (uint8, or a float "quant_storage" dtype that is not the weights'
        # dtype); the adapter trains in the compute dtype instead.
        packed = is_packed(weight)
        dtype = getattr(base_layer, "compute_dtype", None) if packed else weight.dtype
        factory = dict(device=weight.device, dtype=dtype or torch.float32)
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)
        self.reset_lora_parameters(init)
        self.merged = False

    def reset_lora_parameters(self, init: bool | str) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default, = nn.Linear's
        if init is not False:
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.adapter_enabled:
            if self.merged:
                raise RuntimeError("cannot disable a merged LoRA layer; unmerge() first")
            return result
        if self.merged:
            return result
        lora_x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(lora_x))) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base layer's layout ([out, in], or [in, out] for Conv1D)."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta


    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class LoRAHandle(MethodHandle):
    config: LoRAConfig

    def __init__(self, model: nn.Module, config: LoRAConfig, module_names: list[str]):
        super().__init__(model, config)
        self.module_names = module_names

    def lora_layers(self) -> list[tuple[str, LoRALinear]]:
        return [(n, self.model.get_submodule(n)) for n in self.module_names]

    def _saved_model_keys(self) -> list[str]:
        """Model state-dict keys that belong to the adapter (LoRA factors, plus trainable biases)."""
        keys = []
        for key in self.model.state_dict(keep_vars=True):
            if ".lora_A." in key or ".lora_B." in key:
                keys.append(key)
            elif self.config.bias == "all" and key.rsplit(".", 1)[-1] == "bias":
                keys.append(key)
            elif self.config.bias == "lora_only" and any(key == f"{n}.base_layer.bias" for n in self.module_names):
                keys.append(key)
        return keys

    def adapter_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "bias": c.bias,
            "target_modules": peft_target_modules(self.model, self.module_names),
            "fan_in_fan_out": any(m.fan_in_fan_out for _, m in self.lora_layers()),
            "use_rslora": c.use_rslora,
            "use_dora": False,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "init_lora_weights": c.init_lora_weights,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def merge(self) -> None:
        for _, layer in self.lora_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        """Fold every update into its base layer and put the plain layers back: a standard HF model again."""
        self.merge()
        return cast_model(self.remove(), dtype)

    def remove(self) -> nn.Module:
        for name, layer in self.lora_layers():
            replace_module(self.model, name, layer.base_layer)
        return self.model


def peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT's ``target_modules`` that selects exactly ``names``: short names if they are unambiguous, else a regex."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    matched = {
        n for n, m in model.named_modules()
        if (isinstance(m, LoRALinear) or linear_like(m)) and n.rsplit(".", 1)[-1] in short and ".base_layer" not in n
        and ".lora_" not in n
    }
    if matched == set(names):
        return short
    return "|".join(re.escape(n) for n in sorted(names))


def attach_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze the model and wrap the target layers; returns the wrapped module names."""
    freeze(model)
    names = find_target_modules(model, config.target_modules)
    wrap_modules(
        model, names,
        lambda _, m: LoRALinear(m, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora,
                                config.init_lora_weights),
    )
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.requires_grad_(True)
        elif name.endswith("bias") and (
            config.bias == "all" or (config.bias == "lora_only" and name.endswith(".base_layer.bias"))
        ):
            p.requires_grad_(True)
    return names


def config_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    """LoRAConfig options from a PEFT ``adapter_config.json``."""
    if data.get("use_dora"):
        raise ValueError("DoRA adapters are not supported by tuneforge's LoRA")
    if data.get("rank_pattern") or data.get("alpha_pattern"):
        raise ValueError("per-module rank_pattern / alpha_pattern in a LoRA adapter are not supported")
    return dict(
        r=data["r"], lora_alpha=data["lora_alpha"], lora_dropout=data.get("lora_dropout", 0.0),
        target_modules=data["target_modules"], bias=data.get("bias", "none"),
        use_rslora=data.get("use_rslora", False),
    )


@register
class LoRA(Method):
    name = "lora"
    config_class = LoRAConfig
    peft_type = "LORA"

    @classmethod
    def attach(cls, model: nn.Module, config: LoRAConfig) -> LoRAHandle:
        return LoRAHandle(model, config, attach_lora(model, config))

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module) -> LoRAConfig:
        return cls.config_class(**config_from_peft(saved))
