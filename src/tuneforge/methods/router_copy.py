"""A trainable copy of an MoE router beside the frozen original (PEFT's ``modules_to_save``).

``--lora-train-router`` lets the router learn which experts the new data needs. The original stays, frozen, as
``original_module``, so ``disabled()`` still computes the base model exactly (DPO's reference); the copy trains as
``modules_to_save`` and is saved under the router's own name, as PEFT saves a ``modules_to_save`` module
(``base_model.model.<router>.weight``), so PEFT loads it back.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Switchable


class RouterCopy(nn.Module, Switchable):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = copy.deepcopy(original)
        for p in self.modules_to_save.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return (self.modules_to_save if self.adapter_enabled else self.original_module)(*args, **kwargs)

    def peft_state(self, path: str) -> dict[str, torch.Tensor]:
        return {f"{path}.{k}": v for k, v in self.modules_to_save.state_dict().items()}

    def peft_keys(self, path: str) -> list[str]:
        return list(self.peft_state(path))

    @torch.no_grad()
    def load_peft_state(self, path: str, state: dict[str, torch.Tensor]) -> None:
        for key, tensor in self.modules_to_save.state_dict(keep_vars=True).items():
            saved = state[f"{path}.{key}"]
            if saved.shape != tensor.shape:
                raise ValueError(f"{path}.{key}: saved shape {tuple(saved.shape)} != model {tuple(tensor.shape)}")
            tensor.copy_(saved)
