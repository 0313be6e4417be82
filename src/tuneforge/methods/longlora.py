"""LongLoRA: LoRA for context extension (Chen et al. 2024, arXiv:2309.12307).

Two changes to LoRA, both from the paper:

* **Trainable embeddings and norms** beside the LoRA factors (§3.3, "LoRA+"): with them, LoRA closes most of the gap
  to full fine-tuning at long context, for ~2% more parameters (the norms are tiny; the input embeddings are not).
  They are saved as whole tensors under PEFT's ``modules_to_save``, so PEFT loads the files, and ``merge`` keeps them
  (they are the model's own weights, trained in place).
* **Shifted sparse attention (S²-Attn)** while training (§3.2): each sequence is cut into groups of
  ``group_size_ratio`` x its length and attention stays inside a group; half of the heads use groups shifted by half
  a group, so information flows between neighbouring groups. The cost of attention falls by 1/ratio. At inference
  the model attends over the whole sequence as usual (the paper's point: the weights need no change to do so).

Unlike the reference code, the shifted groups do not wrap around: the first half-group and the last are groups of
their own, so no token of a causal model sees a later one (the reference rolls the sequence, and the first tokens of
the shifted heads then attend to the last ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .base import register
from .lora import LoRA, LoRAConfig, LoRAHandle, attach_lora, config_from_peft

# Attention implementations S²-Attn can stand in for (it calls SDPA itself while training; outside training the
# original runs, so flash-attention's varlen kernel still serves generation).
DELEGATES = ("sdpa", "flash_attention_2", "flash_attention_3")


@dataclasses.dataclass
class LongLoRAConfig(LoRAConfig):
    """LoRA's options plus LongLoRA's own."""

    method: ClassVar[str] = "longlora"

    group_size_ratio: float = 0.25
    """S²-Attn's group as a fraction of the sequence (the paper's 1/4): attention cost falls by 1/ratio while
    training; 1.0 turns S²-Attn off (full attention)."""
    trainable_embeddings: bool = True
    """Train the input embeddings too (LongLoRA's "LoRA+"; saved whole under PEFT's modules_to_save)."""
    trainable_norms: bool = True
    """Train every normalisation layer's weights too (a few thousand values per layer)."""

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.group_size_ratio <= 1.0:
            raise ValueError(f"longlora group_size_ratio must be in (0, 1], got {self.group_size_ratio}")


def group_spans(length: int, group: int, offset: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` groups of ``group`` positions covering ``range(length)``, the first one
    ``offset`` long when ``offset`` > 0 (the shifted heads), the last one what remains."""
    edges = [0, *range(offset or group, length, group), length]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def grouped_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             spans: list[tuple[int, int]], scaling: float | None, dropout: float) -> torch.Tensor:
    """Causal attention inside each span of positions only (``[batch, heads, time, dim]`` in and out)."""
    return torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                     dropout_p=dropout, is_causal=True, scale=scaling)
                      for a, b in spans], dim=2)


def shifted_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ratio: float,
                             scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """S²-Attn over ``[batch, heads, time, dim]`` (key/value heads already repeated to the query's): the first half
    of the heads in groups of ``ceil(ratio x time)``, the second half in groups shifted by half a group."""
    length, heads = query.shape[2], query.shape[1]
    group = max(2, math.ceil(ratio * length))
    if group >= length:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling)
    half = heads // 2
    plain = grouped_causal_attention(query[:, :half], key[:, :half], value[:, :half], group_spans(length, group, 0),
                                     scaling, dropout)
    shifted = grouped_causal_attention(query[:, half:], key[:, half:], value[:, half:],
                                       group_spans(length, group, group // 2), scaling, dropout)
    return torch.cat([plain, shifted], dim=1)


def s2_attention_function(delegate: str, ratio: float):
    """An attention function for transformers' ``AttentionInterface``: S²-Attn while the module trains, ``delegate``
    (the model's own implementation) otherwise."""
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs):
        if not module.training or query.shape[2] != key.shape[2]:  # evaluation, generation: full attention
            return ALL_ATTENTION_FUNCTIONS[delegate](module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, **kwargs)
        # Training rows are right-padded or unpadded: a causal group never reaches the padding after its tokens.
        groups = getattr(module, "num_key_value_groups", 1)
        out = shifted_sparse_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), ratio, scaling,
                                       dropout)
        return out.transpose(1, 2).contiguous(), None

    return attention


def use_s2_attention(model: nn.Module, ratio: float) -> str:
    """Register S²-Attn (with ``ratio``) in transformers' attention and mask interfaces, standing in for the model's
    current implementation, and switch the model to it; returns the implementation's name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    current = model.config._attn_implementation
    delegate = current.split(":", 1)[1] if current.startswith("s2_attention:") else current
    if delegate not in DELEGATES:
        raise ValueError(f"longlora's S2-Attn needs sdpa or flash-attention; this model uses {delegate!r} attention")
    name = f"s2_attention:{delegate}:{ratio:g}"
    AttentionInterface.register(name, s2_attention_function(delegate, ratio))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[delegate])  # masks as the delegate's
    set_attention(model, name)
    return name


def set_attention(model: nn.Module, name: str) -> None:
    for module in model.modules():  # every sub-config (a multimodal model's text config too)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


def extra_trainable_names(model: nn.Module, config: LongLoRAConfig) -> list[str]:
    """The modules LongLoRA trains whole: the input embeddings and the normalisation layers, as configured."""
    names = []
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if config.trainable_embeddings and module is embeddings:
            names.append(name)
        elif config.trainable_norms and "norm" in type(module).__name__.lower() and ".lora_" not in name:
            names.append(name)
    return names


def train_copies(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Give each parameter of the modules ``names`` a trainable copy in its place and return the originals, frozen
    and untouched, by parameter name: as PEFT's modules_to_save keeps the original module, so that ``disabled()``
    computes the base model (the DPO reference, the "before" evaluations). Tied output embeddings stay tied."""
    output = model.get_output_embeddings()
    originals = {}
    for name in names:
        module = model.get_submodule(name)
        for p_name, p in list(module.named_parameters(recurse=False)):
            copy = nn.Parameter(p.detach().clone(), requires_grad=True)
            setattr(module, p_name, copy)
            if output is not None and getattr(output, "weight", None) is p:
                output.weight = copy
            originals[f"{name}.{p_name}"] = p.detach()
    return originals


class LongLoRAHandle(LoRAHandle):
    config: LongLoRAConfig

    def __init__(self, model: nn.Module, config: LongLoRAConfig, module_names: list[str], whole: list[str]):
        super().__init__(model, config, module_names)
        self.whole_modules = whole
        self.original_attention = model.config._attn_implementation.split(":")[1]
        self.originals = train_copies(model, whole)

    def whole_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{name}.{p_name}", p) for name in self.whole_modules
                for p_name, p in self.model.get_submodule(name).named_parameters(recurse=False)]

    def float32_parameters(self) -> list[tuple[str, nn.Parameter]]:
        # The embeddings and norms keep the model's dtype: their outputs feed the frozen layers, as PEFT's
        # modules_to_save do; only the LoRA factors (which cast their input) train in float32.
        whole = dict(self.whole_parameters())
        return [(n, p) for n, p in self.trainable_parameters() if n not in whole]

    def _saved_model_keys(self) -> list[str]:
        return super()._saved_model_keys() + [name for name, _ in self.whole_parameters()]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        trained = {name: p.data for name, p in self.whole_parameters()}
        params = dict(self.whole_parameters())
        with super().disabled():
            try:
                for name, p in params.items():
                    p.data = self.originals[name]
                yield
            finally:
                for name, p in params.items():
                    p.data = trained[name]

    def adapter_config(self) -> dict[str, Any]:
        # PEFT keeps these modules as trained copies and saves them under the model's own keys, as here.
        short_names = sorted({name.rsplit(".", 1)[-1] for name in self.whole_modules})
        return {**super().adapter_config(), "modules_to_save": short_names}

    def merge_and_unload(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        set_attention(self.model, self.original_attention)  # the merged model attends as any other
        return super().merge_and_unload(dtype)

    def remove(self) -> nn.Module:
        set_attention(self.model, self.original_attention)
        return super().remove()


@register
class LongLoRA(LoRA):
    name = "longlora"
    aliases = ("long_lora",)
    config_class = LongLoRAConfig
    # PEFT's files say LORA (with modules_to_save); tuneforge's own record says longlora.
    peft_type = None
    packing_refusal = ("S2-Attn groups the positions of a row, so packed examples would share groups; LongLoRA trains "
                       "on long examples, one per row")

    @classmethod
    def attach(cls, model: nn.Module, config: LongLoRAConfig) -> LongLoRAHandle:
        names = attach_lora(model, config)
        whole = extra_trainable_names(model, config)
        use_s2_attention(model, config.group_size_ratio)
        return LongLoRAHandle(model, config, names, whole)

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module) -> LongLoRAConfig:
        own = {k: options[k] for k in ("group_size_ratio", "trainable_embeddings", "trainable_norms") if k in options}
        return LongLoRAConfig(**config_from_peft(saved), **own)
