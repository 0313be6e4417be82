"""Odds Ratio Preference Optimisation (Hong et al. 2024, arXiv:2403.07691): SFT and preference alignment in one
loss, with no reference model.

``loss = NLL(chosen) - λ · log σ(log odds(y_c) - log odds(y_r))``, where ``odds(y) = P(y|x) / (1 - P(y|x))`` and
``log P(y|x)`` is the response's **mean** token log-probability (eqs. 4-7). The odds-ratio term is TRL's
``ORPOTrainer.odds_ratio_loss`` (trl.experimental.orpo in trl 1.16). The NLL is the paper's: the mean token
cross-entropy of the chosen responses (TRL's ORPOTrainer also counts the prompt's tokens in it).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import ObjectiveConfig, PairObjective, TrainContext, disable_dropout, register
from ..models.logprobs import chosen_nll, response_lengths, sequence_logps


@dataclasses.dataclass
class ORPOConfig(ObjectiveConfig):
    """Options of ORPO (names as in TRL's ORPOConfig)."""

    objective: ClassVar[str] = "orpo"

    beta: float = 0.1
    """λ, the weight of the odds-ratio term beside the chosen answers' NLL (the paper's 0.1)."""
    disable_dropout: bool = True
    """Turn off dropout (TRL's default), so chosen and rejected are scored by the same network."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"orpo beta must be positive, got {self.beta}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ``-β · log σ(log odds ratio)`` (to add to the NLL) and the log odds ratios, from mean token
    log-probabilities."""
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -beta * F.logsigmoid(log_odds), log_odds.detach()


@register
class ORPO(PairObjective):
    name = "orpo"
    aliases = ("odds_ratio_preference_optimization",)
    purpose = "ORPO"
    config_class = ORPOConfig

    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        logps = sequence_logps(model, batch)
        lengths = response_lengths(batch)
        chosen, rejected = logps.chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        chosen_mean, rejected_mean = chosen / chosen_lengths.clamp(min=1), rejected / rejected_lengths.clamp(min=1)
        or_losses, log_odds = odds_ratio_loss(chosen_mean, rejected_mean, self.config.beta)
        pairs = len(chosen)
        # The NLL is a token mean over the micro-batch's chosen answers, counted once per pair: the trainer
        # divides the summed loss by the number of pairs.
        nll = chosen_nll(chosen, chosen_lengths)
        loss = or_losses.sum() + nll * pairs
        rewards_c, rewards_r = self.config.beta * chosen_mean.detach(), self.config.beta * rejected_mean.detach()
        return loss, {
            "loss": loss.detach(),
            "nll_loss": nll.detach() * pairs,
            "log_odds_ratio": log_odds.sum(),
            "rewards/chosen": rewards_c.sum(),
            "rewards/rejected": rewards_r.sum(),
            "rewards/accuracies": (rewards_c > rewards_r).sum(),
            "rewards/margins": (rewards_c - rewards_r).sum(),
        }
