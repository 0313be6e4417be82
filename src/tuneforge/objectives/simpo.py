"""Simple Preference Optimisation (Meng et al. 2024, arXiv:2405.14734): DPO without a reference model.

The implicit reward is the response's **mean** token log-probability scaled by β, and the chosen answer must beat
the rejected one by a target margin γ: ``loss = -log σ(β · (mean log π(y_c) - mean log π(y_r)) - γ)`` (eq. 6).
Length normalisation keeps the policy from preferring long answers; no reference forward is needed. The loss
is TRL's CPOTrainer with ``loss_type="simpo"`` (trl.experimental.cpo in trl 1.16), label smoothing included.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import ObjectiveConfig, PairObjective, TrainContext, disable_dropout, register
from ..models.logprobs import response_lengths, sequence_logps


@dataclasses.dataclass
class SimPOConfig(ObjectiveConfig):
    """Options of SimPO (TRL's CPOConfig names: beta, simpo_gamma here ``gamma``, label_smoothing)."""

    objective: ClassVar[str] = "simpo"

    beta: float = 2.0
    """Scale of the length-normalised reward; the paper uses 2.0-2.5 (larger: sharper preference)."""
    gamma: float = 0.5
    """Target reward margin γ the chosen answer must clear (TRL's simpo_gamma; the paper tunes 0.5-1.5)."""
    label_smoothing: float = 0.0
    """The assumed probability that a pair's label is wrong, in [0, 0.5) (conservative loss, as in cDPO)."""
    disable_dropout: bool = True
    """Turn off dropout (TRL's default), so chosen and rejected are scored by the same network."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"simpo beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"simpo label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def simpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO losses from mean token log-probabilities."""
    logits = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register
class SimPO(PairObjective):
    name = "simpo"
    aliases = ("simple_preference_optimization",)
    purpose = "SimPO"
    config_class = SimPOConfig

    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        mean_logps = (sequence_logps(model, batch)
                      / response_lengths(batch).clamp(min=1))
        chosen, rejected = mean_logps.chunk(2)
        loss = simpo_loss(chosen, rejected, c.beta, c.gamma, c.label_smoothing).sum()
        rewards_c, rewards_r = c.beta * chosen.detach(), c.beta * rejected.detach()
        return loss, {
            "loss": loss.detach(),
            "rewards/chosen": rewards_c.sum(),
            "rewards/rejected": rewards_r.sum(),
            "rewards/accuracies": (rewards_c > rewards_r).sum(),
            "rewards/margins": (rewards_c - rewards_r).sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
