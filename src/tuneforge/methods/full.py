"""Full fine-tuning: every weight of the model trains. The result is a whole Hugging Face model directory."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .base import Method, MethodConfig, MethodHandle, cast_model, register


@dataclasses.dataclass
class FullConfig(MethodConfig):
    """Options of full fine-tuning."""

    train_embeddings: bool = True
    """Also train the token embeddings (and a tied output head). Off keeps the vocabulary's geometry fixed,
    which helps on tiny data sets and saves the embedding's optimiser state (often the largest tensor)."""


class FullHandle(MethodHandle):
    config: FullConfig

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def adapter_config(self) -> dict[str, Any]:
        raise TypeError("full fine-tuning saves a whole model, not an adapter")

    def save(self, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
        directory = Path(directory)
        self.model.save_pretrained(directory, safe_serialization=True)
        return directory

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        # Every weight changed: the base model only survives as a separate copy (the trainer loads one for DPO/PPO).
        raise RuntimeError("full fine-tuning has no adapter to disable; load a separate reference model")
        yield  # pragma: no cover

    def merge(self) -> None:  # nothing to fold: the weights already are the model
        pass

    def unmerge(self) -> None:
        pass

    def merge_and_unload(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        return cast_model(self.model, dtype)  # already a plain model


@register
class Full(Method):
    name = "full"
    config_class = FullConfig
    aliases = ("full_finetune", "full_ft")
    default_learning_rate = 2e-5
    trains_base_weights = True

    @classmethod
    def attach(cls, model: nn.Module, config: FullConfig) -> FullHandle:
        for p in model.parameters():
            p.requires_grad_(p.dtype.is_floating_point)
        if not config.train_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
            out = model.get_output_embeddings()
            if out is not None:
                out.weight.requires_grad_(False)
        return FullHandle(model, config)

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> FullHandle:
        raise TypeError(f"{adapter_dir} is a full model: pass it as --model, not --adapter")
