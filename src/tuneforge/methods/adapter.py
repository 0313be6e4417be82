"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247).

A small residual MLP is inserted after a sub-layer of every transformer block: ``h + W_up f(W_down h)`` with
``W_down: [m, d]``, ``W_up: [d, m]`` and a bottleneck ``m ≪ d``. ``W_up`` starts at zero, so training starts from
the base model's exact outputs. Placement "pfeiffer" puts one adapter after the feed-forward block (half the
parameters, about the same quality in Pfeiffer et al.); "houlsby" adds a second one after the attention block.

The adapters sit on forward hooks of the attention / feed-forward sub-modules (the output of the sub-layer, before
the residual add, as in Houlsby's Fig. 2), so no module of the base model is replaced and every architecture whose
blocks have named attention and feed-forward children works: Llama ``self_attn``/``mlp``, GPT-2 ``attn``/``mlp``,
OPT ``self_attn``/``fc2``. The adapters are children of their block: ``<block>.attention_adapter`` and
``<block>.output_adapter`` (AdapterHub's names). PEFT has no bottleneck adapters: the files are PEFT's two, with
``peft_type: TUNEFORGE_BOTTLENECK_ADAPTER`` and keys ``base_model.model.<path>``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.hooks import RemovableHandle

from .base import (
    ADAPTER_CONFIG_NAME,
    Method,
    MethodConfig,
    MethodHandle,
    Switchable,
    freeze,
    model_dims,
    register,
    replace_module,
    wrap_modules,
)

PEFT_TYPE = "TUNEFORGE_BOTTLENECK_ADAPTER"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}
# Names of a block's attention and feed-forward children across transformers' architectures, tried in order.
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "fc2")


@dataclasses.dataclass
class AdapterConfig(MethodConfig):
    """Options of bottleneck adapters (names as in the papers and AdapterHub)."""

    placement: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    """pfeiffer: one adapter after each block's feed-forward sub-layer; houlsby: also one after its attention."""
    reduction_factor: int = 16
    """The bottleneck is hidden_size / reduction_factor wide; smaller factors train more parameters."""
    bottleneck_size: int | None = None
    """The bottleneck width m, if given; it overrides reduction_factor."""
    non_linearity: Literal["relu", "gelu", "silu", "swish", "tanh"] = "relu"
    """Activation between the projections. relu is AdapterHub's default for both placements and the cheapest; the
    zero-initialised up-projection makes the start independent of it; gelu/silu match GPT-2/Llama's own FFNs."""
    train_layer_norms: bool = False
    """Also train each block's layer norms (Houlsby et al. do): trained copies are used, the base's stay intact."""
    attention_module: str | None = None
    """Name of the attention child of each block (default: found among self_attn, attn, attention, ...)."""
    ffn_module: str | None = None
    """Name of the feed-forward child of each block (default: found among mlp, feed_forward, ffn, fc2, ...)."""

    def __post_init__(self):
        self.placement = self.placement.lower()
        if self.placement not in ("pfeiffer", "houlsby"):
            raise ValueError(f"adapter placement must be pfeiffer or houlsby, got {self.placement!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"adapter non_linearity must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.non_linearity!r}")
        if self.reduction_factor <= 0 or (self.bottleneck_size is not None and self.bottleneck_size <= 0):
            raise ValueError("adapter reduction_factor and bottleneck_size must be positive")

    def bottleneck(self, hidden_size: int) -> int:
        return self.bottleneck_size or max(1, hidden_size // self.reduction_factor)


class BottleneckAdapter(nn.Module, Switchable):
    """``h + adapter_up(f(adapter_down(h)))``, applied to a sub-module's output by a forward hook."""

    def __init__(self, hidden_size: int, bottleneck: int, non_linearity: str, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.adapter_down = nn.Linear(hidden_size, bottleneck, dtype=dtype, device=device)
        self.non_linearity = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck, hidden_size, dtype=dtype, device=device)
        # Down keeps nn.Linear's Kaiming-uniform init (as LoRA's A); up at zero makes the adapter the identity.
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.adapter_down.weight.dtype)
        return hidden + self.adapter_up(self.non_linearity(self.adapter_down(x))).to(hidden.dtype)

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self.adapter_enabled:
            return output
        # Attention modules return (hidden, attention weights, ...): only the hidden states are adapted.
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


class AdaptedNorm(nn.Module, Switchable):
    """A layer norm computed with trainable copies of its affine parameters; the base norm stays untouched."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.names = [n for n, _ in base_layer.named_parameters(recurse=False)]
        for name, p in base_layer.named_parameters(recurse=False):
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, *args, **kwargs):
        if not self.adapter_enabled:
            return self.base_layer(*args, **kwargs)
        # functional_call runs the norm's own forward (LayerNorm, RMSNorm, Gemma's 1+w ...) on the copies, cast to
        # the base's dtype (the trainer keeps trainable copies in float32 over a bf16 base).
        base = dict(self.base_layer.named_parameters(recurse=False))
        params = {n: getattr(self, n).to(base[n].dtype) for n in self.names}
        return functional_call(self.base_layer, params, args, kwargs)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the first ModuleList with one entry per hidden layer."""
    layers = model_dims(model)["num_layers"]
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and len({type(m) for m in module}) == 1:
            return name, module
    raise ValueError(f"found no list of {layers} transformer blocks in {type(model).__name__}")


def find_child(block: nn.Module, explicit: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The name of a block's sub-module: ``explicit`` if given, else the first candidate the block has."""
    names = [explicit] if explicit else list(candidates)
    for name in names:
        try:
            block.get_submodule(name)
            return name
        except AttributeError:
            continue
    children = ", ".join(n for n, _ in block.named_children())
    raise ValueError(f"no {what} sub-module {'/'.join(names)} in {type(block).__name__} (children: {children}); "
                     f"name it with the adapter option {what}_module")


def norm_names(block: nn.Module) -> list[str]:
    """A block's own layer norms (LayerNorm, RMSNorm, ...): direct children with a weight, named like norms."""
    return [n for n, m in block.named_children()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)]


class AdapterHandle(MethodHandle):
    config: AdapterConfig

    def __init__(self, model: nn.Module, config: AdapterConfig, hooked: dict[str, str], hooks: list[RemovableHandle],
                 norms: list[str]):
        super().__init__(model, config)
        self.hooked = hooked  # adapter path -> path of the sub-module whose output it adapts
        self.hooks = hooks
        self.norms = norms

    def _saved_model_keys(self) -> list[str]:
        keys = [k for k in self.model.state_dict() if any(k.startswith(a + ".") for a in self.hooked)]
        keys += [f"{n}.{p}" for n in self.norms for p in self.model.get_submodule(n).names]
        return keys

    def adapter_config(self) -> dict[str, Any]:
        c = self.config
        block = decoder_blocks(self.model)[1][0]
        return {
            "peft_type": PEFT_TYPE,
            "task_type": "CAUSAL_LM",
            "placement": c.placement,
            "bottleneck_size": c.bottleneck(model_dims(self.model)["hidden_size"]),
            "reduction_factor": c.reduction_factor,
            "non_linearity": c.non_linearity,
            "train_layer_norms": c.train_layer_norms,
            "attention_module": find_child(block, c.attention_module, ATTENTION_NAMES, "attention")
            if c.placement == "houlsby" else c.attention_module,
            "ffn_module": find_child(block, c.ffn_module, FFN_NAMES, "ffn"),
            "inference_mode": True,
        }

    def remove(self) -> nn.Module:
        """Take every adapter, hook and norm copy off: the model is the plain base model again."""
        for hook in self.hooks:
            hook.remove()
        for path in self.hooked:
            block, _, name = path.rpartition(".")
            delattr(self.model.get_submodule(block), name)
        for name in self.norms:
            replace_module(self.model, name, self.model.get_submodule(name).base_layer)
        return self.model


def attach_adapters(model: nn.Module, config: AdapterConfig) -> AdapterHandle:
    """Freeze the model, hook an adapter onto each block's sub-layer(s), optionally copy its norms to train."""
    freeze(model)
    prefix, blocks = decoder_blocks(model)
    hidden = model_dims(model)["hidden_size"]
    words = model.get_input_embeddings().weight  # never quantised: its dtype is the model's compute dtype
    sites = {"output_adapter": find_child(blocks[0], config.ffn_module, FFN_NAMES, "ffn")}
    if config.placement == "houlsby":
        sites["attention_adapter"] = find_child(blocks[0], config.attention_module, ATTENTION_NAMES, "attention")
    hooked, hooks, norms = {}, [], []
    for i, block in enumerate(blocks):
        for adapter_name, target in sites.items():
            adapter = BottleneckAdapter(hidden, config.bottleneck(hidden), config.non_linearity, words.dtype,
                                        words.device)
            block.add_module(adapter_name, adapter)
            hooks.append(block.get_submodule(target).register_forward_hook(adapter.hook))
            hooked[f"{prefix}.{i}.{adapter_name}"] = f"{prefix}.{i}.{target}"
        if config.train_layer_norms:
            norms += [f"{prefix}.{i}.{n}" for n in norm_names(block)]
    wrap_modules(model, norms, lambda _, m: AdaptedNorm(m))
    for path in hooked:
        model.get_submodule(path).requires_grad_(True)
    for path in norms:
        for name in model.get_submodule(path).names:
            getattr(model.get_submodule(path), name).requires_grad_(True)
    return AdapterHandle(model, config, hooked, hooks, norms)


@register
class Adapter(Method):
    name = "adapter"
    aliases = ("adapters", "bottleneck_adapter", "bottleneck_adapters")
    config_class = AdapterConfig
    peft_type = PEFT_TYPE
    # Like LoRA the adapters start at zero and are small; they take a little more than LoRA's 2e-4.
    default_learning_rate = 3e-4

    @classmethod
    def attach(cls, model: nn.Module, config: AdapterConfig) -> AdapterHandle:
        return attach_adapters(model, config)

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module) -> AdapterConfig:
        if saved.get("peft_type") != PEFT_TYPE:
            raise ValueError(f"{ADAPTER_CONFIG_NAME}: peft_type {saved.get('peft_type')!r}, expected {PEFT_TYPE!r}")
        return AdapterConfig(
            placement=saved["placement"], bottleneck_size=saved["bottleneck_size"],
            reduction_factor=saved.get("reduction_factor", 16), non_linearity=saved["non_linearity"],
            train_layer_norms=saved.get("train_layer_norms", False), attention_module=saved.get("attention_module"),
            ffn_module=saved.get("ffn_module"),
        )
