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
import torch.nn.functional as F
from torch import nn

from ..models.moe import expert_parameter_names, find_experts, find_routers
from .lora_experts import LoRAExperts, in_out
from .router_copy import RouterCopy
from .peft_targets import PEFT_MOE_RENAMED, lora_targets, select_parameters
from .base import (
    Method,
    MethodConfig,
    PEFT_PREFIX,
    MethodHandle,
    Switchable,
    cast_model,
    check_rank,
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

    option_aliases: ClassVar[dict[str, str]] = {"init": "init_lora_weights"}

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
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] = True
    """True: A Kaiming-uniform, B zero (start at the base model). "gaussian": A ~ N(0, 1/r). "pissa" (Meng et al.
    2024): B A starts as the weight's top-r singular part; "olora" (Büyükakyüz 2024): from its QR decomposition;
    both leave W - B A·scale in the base, so training starts at the base model's outputs and converges faster.
    False: B random too (only for tests). Also spelt ``init`` (``--lora-init pissa``)."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv:2402.09353): each adapted weight is split into a trained per-row magnitude and a
    direction that LoRA updates; closer to full fine-tuning at low rank, for ~1 extra vector per layer."""
    target_experts: bool = True
    """Mixture-of-experts models: also adapt the routed experts' fused weights (``experts.gate_up_proj`` /
    ``down_proj``), one rank-r pair per expert (PEFT's ``target_parameters``). The experts hold most of an MoE
    model's weights and compute; false adapts only attention, dense and shared-expert layers. See docs/moe.md."""
    target_parameters: list[str] | None = None
    """PEFT's ``target_parameters``: parameters adapted directly, matched as name suffixes (``mlp.experts.down_proj``).
    Read from saved files; None: the fused experts that ``target_experts`` selects."""
    train_router: bool = False
    """Mixture-of-experts models: train a copy of each router too (saved as PEFT's ``modules_to_save``). Off by default:
    the pretrained routing is kept, so experts keep their specialisation and the balancing loss stays quiet."""

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

    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B", "lora_magnitude_vector")
    """The sub-modules and parameters that are the adapter (PEFT's ``adapter_layer_names``): they train, and
    ``adapter_model.safetensors`` holds them (besides the biases the config's ``bias`` trains)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool = False,
                 init: bool | str = True, use_dora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = in_out_features(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PiSSA / OLoRA: the base holds W - B₀A₀·scale, and the first factors are kept to give W back (set below).
        self.decomposed = False
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
        self.use_dora = use_dora
        if use_dora:  # after the factors' initialisation, as PEFT: m starts at ‖W + B A·scale‖, the layer at W
            # DoRA's trained magnitude, one per output row, under PEFT's saved key ``<layer>.lora_magnitude_vector``.
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    def reset_lora_parameters(self, init: bool | str) -> None:
        if init in ("pissa", "olora"):
            self.decompose_base(init)
            return
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
            if self.decomposed:  # PiSSA / OLoRA: the base holds W - B₀A₀·scale; add it back
                lora_x = x.to(self.init_lora_A.dtype)
                return result + ((lora_x @ self.init_lora_A.T) @ self.init_lora_B.T * self.scaling).to(result.dtype)
            return result
        if self.merged:
            return result
        lora_x = x.to(self.lora_A.weight.dtype)
        if self.use_dora:
            return result + self.dora_update(lora_x, result).to(result.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(lora_x))) * self.scaling
        return result + update.to(result.dtype)

    # -- PiSSA / OLoRA ----------------------------------------------------------------------------------
    @torch.no_grad()
    def decompose_base(self, init: str) -> None:
        """PEFT's ``pissa_init`` / ``olora_init``: A and B start as the top-r part of the base weight (SVD, split
        as √S on each side and divided by the scale; or Q and R of its QR), and the base keeps the residual
        W - B A·scale. The first factors stay as buffers, so ``disabled()`` still computes the untouched base."""
        weight = self.base_layer.weight
        if is_packed(weight):
            raise ValueError(f"init_lora_weights={init!r} needs a float base weight (PEFT's rule); initialise on the "
                             "float model, or use plain LoRA init with a quantised base")
        w = weight.float().T if self.fan_in_fan_out else weight.float()
        if init == "pissa":
            V, S, Uh = torch.linalg.svd(w, full_matrices=False)
            root = torch.diag(torch.sqrt(S[:self.r] / self.scaling))
            A, B = root @ Uh[:self.r], V[:, :self.r] @ root
        else:
            Q, R = torch.linalg.qr(w)
            A, B = R[:self.r].contiguous(), Q[:, :self.r].contiguous()
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)
        residual = w - self.scaling * B @ A
        weight.copy_((residual.T if self.fan_in_fan_out else residual).to(weight.dtype))
        self.register_buffer("init_lora_A", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("init_lora_B", self.lora_B.weight.detach().clone(), persistent=False)
        self.decomposed = True

    @torch.no_grad()
    def restore_base(self) -> None:
        """Put W = residual + B₀A₀·scale back into an unmerged PiSSA / OLoRA layer's base (when it is removed)."""
        if self.decomposed and not self.merged:
            weight = self.base_layer.weight
            delta = (self.init_lora_B.float() @ self.init_lora_A.float()) * self.scaling
            weight.add_((delta.T if self.fan_in_fan_out else delta).to(weight.dtype))

    # -- DoRA -------------------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]``, de-quantised for a 4-bit base (PEFT's ``dequantize_module_weight``)."""
        weight = self.base_layer.weight
        if type(weight).__name__ == "Params4bit":
            import bitsandbytes.functional as bnb_functional

            return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
        if is_packed(weight):
            raise ValueError("DoRA needs a float or 4-bit base layer; 8-bit layers are not supported")
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W + B A·scale‖ of each output row (DoRA's column norm in the paper's [in, out] notation)."""
        w = self.base_weight()
        lora = (self.lora_B.weight @ self.lora_A.weight).to(w.dtype)
        return torch.linalg.norm(w + self.scaling * lora, dim=1).to(w.dtype)

    def dora_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output (PEFT's DoraLinearLayer.forward): with s = m / ‖W + B A·scale‖ per row,
        ``(s - 1)·W x + s·B A x·scale``, i.e. the adapted weight rescaled to magnitude m. The norm is detached (the
        paper's §4.3: it saves memory at no loss), so m and the direction train apart."""
        w = self.base_weight().to(x.dtype)
        lora = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype)
        norm = torch.linalg.norm(w + self.scaling * lora.detach(), dim=1).detach()
        scale = (self.lora_magnitude_vector / norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = (result if bias is None else result - bias).to(x.dtype)  # W x, already computed
        else:
            x = self.lora_dropout(x)
            base = F.linear(x, w)  # the dropped-out input through W, as PEFT
        return (scale - 1) * base + scale * self.lora_B(self.lora_A(x)) * self.scaling

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 weight with the update folded in, in ``weight``'s layout: W + ΔW, and for DoRA rescaled row
        by row to the magnitude (PEFT's merge)."""
        merged = weight.float() + self.delta_weight()
        if self.use_dora:
            rows = merged.T if self.fan_in_fan_out else merged
            factor = self.lora_magnitude_vector.float() / torch.linalg.norm(rows, dim=1)
            merged = merged * (factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1))
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        if not self.use_dora:
            return super().merge()
        if self.merged:
            return
        weight = self.base_layer.weight
        if is_packed(weight):
            raise RuntimeError("a quantised base cannot be merged in place; use `tuneforge merge` (it dequantises)")
        self.unmerged_weight = weight.detach().clone()  # DoRA's rescaling is not undone by a subtraction
        weight.copy_(self.merged_weight(weight).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.use_dora:
            return super().unmerge()
        if self.merged:
            self.base_layer.weight.copy_(self.unmerged_weight)
            del self.unmerged_weight
            self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base layer's layout ([out, in], or [in, out] for Conv1D)."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta


    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}" + (", dora" if self.use_dora else "")


def is_adapter_weight(name: str) -> bool:
    """Whether the parameter or state-dict key ``name`` belongs to a LoRA layer's adapter (not its base layer)."""
    return not set(name.split(".")).isdisjoint(LoRALinear.adapter_layer_names)


class LoRAHandle(MethodHandle):
    config: LoRAConfig

    def __init__(self, model: nn.Module, config: LoRAConfig, module_names: list[str]):
        super().__init__(model, config)
        self.module_names = module_names

    def lora_layers(self) -> list[tuple[str, LoRALinear]]:
        return [(n, self.model.get_submodule(n)) for n in self.module_names]

    def expert_layers(self) -> list[tuple[str, LoRAExperts]]:
        """The adapted fused-experts modules (none on a dense model, or with ``target_experts=False``)."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoRAExperts)]

    def _saved_model_keys(self) -> list[str]:
        """Model state-dict keys that belong to the adapter (LoRA factors, plus trainable biases); the experts'
        factors are saved in PEFT's layout by ``state_dict``."""
        keys = []
        own_layout = tuple(f"{n}." for n, _ in self.peft_layers())
        for key in self.model.state_dict(keep_vars=True):
            if key.startswith(own_layout):
                continue
            if is_adapter_weight(key):
                keys.append(key)
            elif self.config.bias == "all" and key.rsplit(".", 1)[-1] == "bias":
                keys.append(key)
            elif self.config.bias == "lora_only" and any(key == f"{n}.base_layer.bias" for n in self.module_names):
                keys.append(key)
        return keys

    def router_layers(self) -> list[tuple[str, RouterCopy]]:
        """The routers trained as copies (``train_router``)."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, RouterCopy)]

    def peft_layers(self) -> list[tuple[str, LoRAExperts | RouterCopy]]:
        """Modules whose saved tensors are laid out as PEFT's, not as our module tree (``peft_state``)."""
        return self.expert_layers() + self.router_layers()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for name, layer in self.peft_layers():
            state.update(layer.peft_state(PEFT_PREFIX + name))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {}
        for name, layer in self.peft_layers():
            keys = list(layer.peft_state(PEFT_PREFIX + name))
            missing = [k for k in keys if k not in state]
            if missing:
                raise KeyError(f"adapter weights do not fit this model: missing {missing[:5]}")
            own[name] = {k: state[k] for k in keys}
        taken = {k for tensors in own.values() for k in tensors}
        super().load_state_dict({k: v for k, v in state.items() if k not in taken})
        for name, layer in self.peft_layers():
            layer.load_peft_state(PEFT_PREFIX + name, own[name])

    def adapter_config(self) -> dict[str, Any]:
        c = self.config
        expert_parameters = [f"{n}.{p}" for n, layer in self.expert_layers() for p in layer.parameter_names]
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "bias": c.bias,
            **lora_targets(self.model, self.module_names, expert_parameters),
            "fan_in_fan_out": any(m.fan_in_fan_out for _, m in self.lora_layers()),
            "use_rslora": c.use_rslora,
            "use_dora": c.use_dora,
            "modules_to_save": [n for n, _ in self.router_layers()] or None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "init_lora_weights": c.init_lora_weights,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def merge(self) -> None:
        for _, layer in self.lora_layers() + self.expert_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.lora_layers() + self.expert_layers():
            layer.unmerge()

    def merge_and_unload(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        """Fold every update into its base layer and put the plain layers back: a standard HF model again."""
        self.merge()
        for name, router in self.router_layers():
            replace_module(self.model, name, router.modules_to_save)  # the trained router is the merged one
        return cast_model(self.remove(), dtype)

    def remove(self) -> nn.Module:
        for name, layer in self.lora_layers():
            layer.restore_base()  # PiSSA / OLoRA left a residual in the base; an unmerged removal restores W
            replace_module(self.model, name, layer.base_layer)
        for name, experts in self.expert_layers():
            replace_module(self.model, name, experts.base_layer)
        for name, router in self.router_layers():
            replace_module(self.model, name, router.original_module)
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
    """Freeze the model and wrap the target layers (and fused experts); returns the wrapped linear layers' names."""
    freeze(model)
    names, experts = lora_selection(model, config)
    if names:
        check_rank(model, names, config.r)
    check_expert_options(model, config, names, experts)
    wrap_modules(
        model, names,
        lambda _, m: LoRALinear(m, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora,
                                config.init_lora_weights, config.use_dora),
    )
    for name, parameters in experts.items():
        replace_module(model, name, LoRAExperts(model.get_submodule(name), parameters, config.r, config.lora_alpha,
                                                config.use_rslora, config.init_lora_weights))
    if config.train_router:
        routers = find_routers(model)
        if not routers:
            raise ValueError("train_router: this model has no mixture-of-experts router")
        wrap_modules(model, routers, lambda _, m: RouterCopy(m))
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue  # a trained router's frozen original
        if is_adapter_weight(name):
            p.requires_grad_(True)
        elif name.endswith("bias") and (
            config.bias == "all" or (config.bias == "lora_only" and name.endswith(".base_layer.bias"))
        ):
            p.requires_grad_(True)
    return names


def lora_selection(model: nn.Module, config: LoRAConfig) -> tuple[list[str], dict[str, list[str]]]:
    """The linear layers to wrap and ``{experts module: [fused parameters]}`` to adapt, by PEFT's rules: a saved
    file's ``target_parameters`` may name experts' 3-D weights or linear layers' 2-D ``weight`` (see peft_targets)."""
    names = [] if config.target_modules == [] else find_target_modules(model, config.target_modules)
    experts: dict[str, list[str]] = {}
    if config.target_parameters is None:
        if config.target_experts:
            experts = {n: expert_parameter_names(model.get_submodule(n)) for n in find_experts(model)}
        return names, experts
    selected = select_parameters(model, config.target_parameters)
    if not selected:
        raise ValueError(f"target_parameters={config.target_parameters!r} matched no parameter of the model")
    experts_modules = set(find_experts(model))
    for key in selected:
        module_name, _, parameter = key.rpartition(".")
        if module_name in experts_modules and parameter in expert_parameter_names(model.get_submodule(module_name)):
            experts.setdefault(module_name, []).append(parameter)
        elif parameter == "weight" and linear_like(model.get_submodule(module_name)):
            names.append(module_name)
        else:
            raise ValueError(f"target_parameters: {key} is neither a fused expert weight nor a linear layer's weight")
    return sorted(set(names)), experts


def check_expert_options(model: nn.Module, config: LoRAConfig, names: list[str], experts: dict[str, list[str]]):
    """Refuse what PEFT's ParamWrapper (which loads expert adapters) refuses, before allocating anything."""
    moe = bool(find_experts(model))
    renamed = [n for n in names if moe and n.rsplit(".", 1)[-1] in PEFT_MOE_RENAMED]
    if not experts and not renamed:
        return
    what = "fused experts" if experts else f"{renamed[0]} of an MoE model"
    for bad, value in (("lora_dropout", config.lora_dropout), ("use_dora", config.use_dora)):
        if value:
            raise ValueError(f"{bad}={value} with LoRA on {what}: PEFT loads these as target_parameters, which take "
                             f"neither dropout nor DoRA; set {bad} off or --lora-target-experts false and "
                             "target_modules without gate_proj/up_proj/down_proj")
    for name, parameters in experts.items():
        limit = max(min(in_out(model.get_submodule(name), p)) for p in parameters)
        if config.r > limit:
            raise ValueError(f"r={config.r} exceeds the smaller dimension of the experts in {name} (at most {limit})")


def saves_routers(saved: dict[str, Any], model: nn.Module) -> bool:
    """Whether a file's ``modules_to_save`` are the model's MoE routers (a trained router; PEFT's name rule). Any
    other module there is not read by LoRA: loading then fails naming its tensors."""
    kept = saved.get("modules_to_save") or []
    routers = find_routers(model)
    return bool(kept) and all(any(r == k or r.endswith("." + k) for r in routers) for k in kept)


def config_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    """LoRAConfig options from a PEFT ``adapter_config.json``."""
    init = data.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "pissa", "olora"):
        raise ValueError(f"LoRA init_lora_weights={init!r} is not supported (tuneforge reads true, false, gaussian, "
                         "pissa and olora)")
    if data.get("rank_pattern") or data.get("alpha_pattern"):
        raise ValueError("per-module rank_pattern / alpha_pattern in a LoRA adapter are not supported")
    return dict(
        r=data["r"], lora_alpha=data["lora_alpha"], lora_dropout=data.get("lora_dropout", 0.0),
        target_modules=data.get("target_modules") or [], bias=data.get("bias", "none"),
        target_parameters=data.get("target_parameters") or None, target_experts=bool(data.get("target_parameters")),
        use_rslora=data.get("use_rslora", False), use_dora=bool(data.get("use_dora", False)),
        # PiSSA / OLoRA saved as PEFT saves them: the base is decomposed again on loading, then A and B are replaced.
        init_lora_weights=init,
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
        return cls.config_class(**config_from_peft(saved), train_router=saves_routers(saved, model))
