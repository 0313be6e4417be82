"""Direct Preference Optimisation (Rafailov et al. 2023, arXiv:2305.18290).

The policy is trained directly on preference pairs, with the implicit reward ``β · log π(y|x) / π_ref(y|x)``:
``loss = -log σ(β · ((log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))))``, where each log π(y|x) is
summed over the response's tokens only. The reference is the frozen starting model: the adapter disabled (no
second copy) or, for full fine-tuning, a separately loaded model. With ``precompute_ref_log_probs`` its
log-probabilities are computed once before training and the reference costs nothing afterwards.

Variants: ``label_smoothing`` ε > 0 is conservative DPO (Mitchell 2023: the labels are flipped with
probability ε); ``loss_type: ipo`` is IPO (Azar et al. 2023, eq. 17), with log-ratios averaged per token as
TRL does (checked with the IPO authors, per TRL's comment). ``rpo_alpha`` > 0 adds the chosen responses' negative
log-likelihood (RPO, Pang et al. 2024, arXiv:2404.19733): DPO alone can lower the likelihood of *both* answers
while it widens their margin, and the NLL term keeps the chosen answer likely.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import to_device
from ..data.formats import Example
from ..data.preference import PairItem
from .base import ObjectiveConfig, PairObjective, TrainContext, disable_dropout, register
from ..models.logprobs import chosen_nll, response_lengths, sequence_logps

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DPOConfig(ObjectiveConfig):
    """Options of DPO (names as in TRL's DPOConfig)."""

    objective: ClassVar[str] = "dpo"

    beta: float = 0.1
    """Strength of the pull towards the reference: larger β keeps the policy closer to it (0.1 is the paper's)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's logistic loss; ipo: IPO's squared loss, which does not push margins to infinity."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a pair's label is wrong, in [0, 0.5) (sigmoid only)."""
    rpo_alpha: float = 0.0
    """Weight of the chosen responses' mean token NLL added to the loss (RPO; TRL: loss_type=["sigmoid", "sft"],
    loss_weights=[1, rpo_alpha]). 0 is plain DPO; ~1 keeps the chosen answers' likelihood from falling."""
    precompute_ref_log_probs: bool = False
    """Score every pair with the reference once before training, instead of a no-grad forward per step:
    cheaper from the second epoch on, and the only reference forward a full fine-tune needs."""
    precompute_batch_size: int = 8
    """Pairs per forward pass while precomputing reference log-probabilities."""
    disable_dropout: bool = True
    """Turn off dropout (TRL's default), so policy and reference score a sequence identically at step 0."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"dpo beta must be positive, got {self.beta}")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"dpo loss_type must be sigmoid or ipo, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("dpo label_smoothing applies to the sigmoid loss only, not to ipo")
        if self.rpo_alpha < 0:
            raise ValueError(f"dpo rpo_alpha must be >= 0, got {self.rpo_alpha}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO / IPO losses and the implicit rewards ``β · log-ratio`` of chosen and rejected.

    Inputs are ``[pairs]`` sequence log-probabilities (summed over response tokens); IPO also needs the
    responses' token counts.
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        logits = chosen_logratios - rejected_logratios
        # Conservative DPO: the expected loss when each label is flipped with probability ε.
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the responses' token counts")
        logits = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (logits - 1 / (2 * beta)) ** 2  # IPO eq. 17, with τ = β
    else:
        raise ValueError(f"unknown dpo loss_type {loss_type!r}; expected sigmoid or ipo")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@register
class DPO(PairObjective):
    name = "dpo"
    aliases = ("direct_preference_optimization",)
    purpose = "DPO"
    config_class = DPOConfig
    needs_reference = True

    def __init__(self, tokenizer, options: dict[str, Any] | None = None):
        super().__init__(tokenizer, options)
        self.prepared: list[PairItem] = []  # every split's pairs, for precomputing reference log-probs

    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[PairItem]:
        items = super().prepare(examples, max_length, split)
        self.prepared += items
        return items

    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)
        if self.config.precompute_ref_log_probs:
            self.precompute_reference(model, ctx)

    @torch.no_grad()
    def precompute_reference(self, model: nn.Module, ctx: TrainContext) -> None:
        """Store each pair's reference log-probs on the item; batches then carry them (see ``collate_pairs``)."""
        todo = [item for item in self.prepared if item.ref_logps is None]
        device = next(model.parameters()).device
        bs = self.config.precompute_batch_size
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            batch = to_device(self.collate(chunk), device)
            logps = self.reference_logps(batch, ctx).tolist()  # chosen rows, then rejected rows
            for item, c, r in zip(chunk, logps[:len(chunk)], logps[len(chunk):]):
                item.ref_logps = (c, r)
        log.info("precomputed reference log-probs of %d pairs", len(todo))

    @staticmethod
    @torch.no_grad()
    def reference_logps(batch: dict[str, torch.Tensor], ctx: TrainContext) -> torch.Tensor:
        with ctx.reference() as reference:
            return sequence_logps(reference, batch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        # Chosen and rejected rows go through the model in one pass (TRL's concatenated forward).
        policy_chosen, policy_rejected = sequence_logps(model, batch).chunk(2)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.reference_logps(batch, ctx).chunk(2)
        lengths = response_lengths(batch)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        c = self.config
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, c.beta, c.loss_type, c.label_smoothing,
            chosen_lengths, rejected_lengths)
        loss = losses.sum()
        metrics = {}
        if c.rpo_alpha:
            # The token mean over the micro-batch's chosen responses (TRL's "sft" loss), once per pair: the
            # trainer divides the summed loss by the number of pairs.
            nll = chosen_nll(policy_chosen, chosen_lengths)
            loss = loss + c.rpo_alpha * nll * len(policy_chosen)
            metrics["nll/chosen"] = nll.detach() * len(policy_chosen)
        return loss, {
            **metrics,
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).sum(),
            "logps/chosen": policy_chosen.detach().sum(),
            "logps/rejected": policy_rejected.detach().sum(),
        }
