"""A hinge loss on preference pairs, the calibration loss of SLiC (Zhao et al. 2023, "SLiC-HF", eq. 1):
``max(0, margin - (log π(y_c) - log π(y_r)))``. The chosen answer must out-score the rejected one by ``margin``
nats; pairs that already do give no gradient. No reference model. The worked example of docs/extending.md.

In the package this file would be ``src/tuneforge/objectives/hinge.py`` plus one line in
``objectives/_load_all.py``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tuneforge.objectives.base import ObjectiveConfig, PairObjective, TrainContext, register
from tuneforge.models.logprobs import sequence_logps


@dataclasses.dataclass
class HingeConfig(ObjectiveConfig):
    """Options of the hinge objective."""

    margin: float = 1.0
    """How many nats (summed over the answer's tokens) the chosen answer must out-score the rejected one by."""

    def __post_init__(self):
        if self.margin <= 0:
            raise ValueError(f"hinge margin must be positive, got {self.margin}")


def hinge_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-pair losses from the answers' summed token log-probabilities."""
    return torch.relu(margin - (chosen_logps - rejected_logps))


@register
class Hinge(PairObjective):  # PairObjective: preference records, batches of chosen rows then rejected rows
    name = "hinge"
    purpose = "hinge preference training"
    config_class = HingeConfig

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = sequence_logps(model, batch).chunk(2)
        losses = hinge_loss(chosen, rejected, self.config.margin)
        # Sums over the batch's pairs: the trainer divides by the pairs of the whole accumulated batch.
        return losses.sum(), {"loss": losses.detach().sum(), "accuracy": (chosen > rejected).sum()}
