"""IA³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): each targeted linear layer's output is rescaled, channel by channel, by a learned vector that starts
at ones, so training starts from the base model's exact outputs. The worked example of docs/extending.md.

In the package this file would be ``src/tuneforge/methods/ia3.py`` plus one line in ``methods/_load_all.py``.
It saves PEFT's IA³ files for the layers PEFT calls non-feed-forward (the output is scaled; PEFT's
``feedforward_modules``, which scale the input instead, are left out to keep the example short), so
``peft.PeftModel.from_pretrained`` loads them with the same logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tuneforge.methods.base import (Method, MethodConfig, MethodHandle, Switchable, find_target_modules, freeze,
                                    in_out_features, register, short_target_names, wrap_modules)


@dataclasses.dataclass
class IA3Config(MethodConfig):
    """Options of IA³ (PEFT's IA3Config names)."""

    target_modules: str | list[str] = dataclasses.field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    """The linear layers to rescale: a list of names (PEFT's rule: a name or a ``.name`` suffix), a regular
    expression, or ``all-linear``. The paper rescales keys, values and the feed-forward activations."""


class IA3Linear(nn.Module, Switchable):
    """``base_layer(x) * ia3_l``: one learned scale per output channel (PEFT's name and shape: ``(out, 1)``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.ia3_l = nn.Parameter(torch.ones(in_out_features(base_layer)[1], 1))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.adapter_enabled:  # handle.disabled(): the base model, which DPO / PPO use as the reference
            return result
        return (result * self.ia3_l.flatten()).to(result.dtype)


class IA3Handle(MethodHandle):
    config: IA3Config

    def _saved_model_keys(self) -> list[str]:
        return [name for name, _ in self.model.named_parameters() if name.endswith(".ia3_l")]

    def adapter_config(self) -> dict[str, Any]:
        wrapped = [name.removesuffix(".ia3_l") for name in self._saved_model_keys()]
        return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": short_target_names(wrapped),
                "feedforward_modules": [], "init_ia3_weights": True, "fan_in_fan_out": False,
                "inference_mode": True, "modules_to_save": None}


@register
class IA3(Method):
    name = "ia3"
    config_class = IA3Config
    peft_type = "IA3"
    # The scales start at one and move by a few percent: they take a larger step than LoRA's 2e-4.
    default_learning_rate = 3e-3

    @classmethod
    def attach(cls, model: nn.Module, config: IA3Config) -> IA3Handle:
        freeze(model)
        wrap_modules(model, find_target_modules(model, config.target_modules), lambda name, layer: IA3Linear(layer))
        return IA3Handle(model, config)

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module) -> IA3Config:
        return IA3Config(target_modules=saved["target_modules"])
