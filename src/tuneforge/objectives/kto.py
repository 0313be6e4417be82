"""Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, arXiv:2402.01306): alignment from unpaired examples,
each answer labelled desirable or not (a thumbs up or down), no preference pairs needed.

With the implicit reward ``r = log π(y|x) - log π_ref(y|x)`` (summed over the answer's tokens) and a reference
point ``z = max(0, KL)``, a desirable answer's loss is ``1 - σ(β (r - z))`` and an undesirable one's
``1 - σ(β (z - r))`` (eq. 7), weighted by ``desirable_weight`` / ``undesirable_weight``. ``z`` is estimated as
TRL does: each prompt of a micro-batch paired with the *previous* example's answer (a mismatched answer the
policy has no reason to favour), ``mean(log π - log π_ref)`` over those pairs, with no gradient. The loss is TRL's
KTOTrainer's (``trl.KTOTrainer``, trl 1.16), including ``loss_type: apo_zero_unpaired`` (APO-zero, D'Oosterlinck
et al. 2024: no reference point). Records: ``{"prompt", "completion", "label": true|false}``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..data.batching import enforce_max_length, truncated
from ..data.formats import Example, examples_of_kind
from ..data.packing import collate_tokens, example_count
from ..data.preference import tokenize_response
from ..data.template import IGNORE_INDEX, Tokenized, prompt_ids
from .base import Objective, ObjectiveConfig, TrainContext, disable_dropout, register
from ..models.logprobs import sequence_logps

log = logging.getLogger(__name__)


@dataclasses.dataclass
class KTOConfig(ObjectiveConfig):
    """Options of KTO (names as in TRL's KTOConfig)."""

    objective: ClassVar[str] = "kto"

    beta: float = 0.1
    """Strength of the pull towards the reference: larger β keeps the policy closer to it."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """kto: the paper's loss with the KL reference point; apo_zero_unpaired: APO-zero, which pushes desirable answers
    up and undesirable ones down with no reference point (use when the good answers beat the model's own)."""
    desirable_weight: float = 1.0
    """Weight of desirable examples' losses; with unbalanced data keep desirable_weight × #desirable /
    (undesirable_weight × #undesirable) within [1, 4/3] (the paper's advice, which TRL checks)."""
    undesirable_weight: float = 1.0
    """Weight of undesirable examples' losses."""
    disable_dropout: bool = True
    """Turn off dropout (TRL's default), so the policy and its reference score an answer identically at step 0."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"kto beta must be positive, got {self.beta}")
        if self.loss_type not in ("kto", "apo_zero_unpaired"):
            raise ValueError(f"kto loss_type must be kto or apo_zero_unpaired, got {self.loss_type!r}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("kto desirable_weight and undesirable_weight must be positive")


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example weighted KTO losses and implicit rewards ``β · log-ratio``; ``labels`` is True for desirable
    examples, ``kl`` the (detached, clamped) reference point."""
    logratios = policy_logps - ref_logps
    if loss_type == "kto":
        desirable = 1 - torch.sigmoid(beta * (logratios - kl))
        undesirable = 1 - torch.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        desirable = 1 - torch.sigmoid(beta * logratios)
        undesirable = torch.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown kto loss_type {loss_type!r}; expected kto or apo_zero_unpaired")
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    return losses, beta * logratios.detach()


@dataclass
class UnpairedItem:
    """A tokenised unpaired example: prompt + completion (labelled), the prompt's length, and its label."""

    example: Tokenized
    prompt_length: int
    label: bool

    @property
    def source(self) -> str:
        return self.example.source


def tokenize_unpaired(tokenizer, example: Example) -> UnpairedItem:
    p_ids = prompt_ids(tokenizer, example.messages)
    tokens = tokenize_response(tokenizer, example.messages, example.completion,
                               f"{example.source}: field 'completion'", p_ids)
    return UnpairedItem(tokens, len(p_ids), bool(example.label))


def mismatched(items: list[UnpairedItem]) -> list[Tokenized]:
    """Each prompt followed by the previous item's completion (TRL's KL pairs: completions shifted by one)."""
    out = []
    for item, other in zip(items, items[-1:] + items[:-1]):
        answer = other.example.input_ids[other.prompt_length:]
        prompt = item.example.input_ids[:item.prompt_length]
        out.append(Tokenized(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, item.example.source))
    return out


@register
class KTO(Objective):
    name = "kto"
    packable = True
    aliases = ("kahneman_tversky_optimization",)
    kinds = ("unpaired",)
    config_class = KTOConfig
    needs_reference = True
    warned_single = False

    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[UnpairedItem]:
        examples = examples_of_kind(examples, self.kinds, "KTO (it needs prompt + completion + label records)")

        def cut(item: UnpairedItem) -> UnpairedItem | None:
            short = truncated(item.example, max_length)
            return None if short is None else UnpairedItem(short, item.prompt_length, item.label)

        items, report = enforce_max_length([tokenize_unpaired(self.tokenizer, ex) for ex in examples], max_length,
                                           self.config.max_length_policy, what="example", cut=cut,
                                           length=lambda item: len(item.example.input_ids))
        log.info("%s: %s", split, report.message(max_length))
        self.length_report = report
        return items

    def collate(self, items: list[UnpairedItem]) -> dict[str, torch.Tensor]:
        batch = self.rows([i.example for i in items])
        batch["label"] = torch.tensor([i.label for i in items], dtype=torch.bool)
        if self.config.loss_type == "kto":
            if len(items) < 2 and not self.warned_single:
                # TRL refuses a per-device batch of 1; an evaluation's last batch can be that small, so warn.
                log.warning("kto: a micro-batch of 1 example pairs its prompt with its own answer, so the KL "
                            "reference point is its implied reward; use micro_batch_size >= 2")
                self.warned_single = True
            kl = self.rows(mismatched(items))
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch

    def rows(self, examples: list[Tokenized]) -> dict[str, torch.Tensor]:
        """The examples as a packed batch (``pack_capacity`` set by the trainer) or a padded one."""
        return collate_tokens(examples, self.tokenizer.pad_token_id, self.pack_capacity)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return example_count(batch)  # examples

    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)

    @staticmethod
    def _logps(model: nn.Module, batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
        return sequence_logps(model, batch, prefix)

    @torch.no_grad()
    def reference_point(self, model: nn.Module, batch: dict[str, Any], ctx: TrainContext) -> torch.Tensor:
        """z: the mismatched pairs' mean log-ratio, clamped at 0, without gradient (0 for APO-zero)."""
        if "kl_input_ids" not in batch:
            return torch.zeros((), device=batch["input_ids"].device)
        policy = self._logps(model, batch, "kl_")
        with ctx.reference() as reference:
            ref = self._logps(reference, batch, "kl_")
        return (policy - ref).mean().clamp(min=0)

    def loss(self, model: nn.Module, batch: dict[str, Any], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        kl = self.reference_point(model, batch, ctx)
        policy = self._logps(model, batch)
        with torch.no_grad(), ctx.reference() as reference:
            ref = self._logps(reference, batch)
        labels = batch["label"]
        losses, rewards = kto_loss(policy, ref, labels, kl, c.beta, c.desirable_weight, c.undesirable_weight,
                                   c.loss_type)
        loss = losses.sum()
        n = len(labels)
        return loss, {
            "loss": loss.detach(),
            "kl": kl * n,  # one number per micro-batch, carried as value × units
            "rewards/desirable": rewards[labels].sum(),
            "rewards/undesirable": rewards[~labels].sum(),
            "desirable": labels.sum(),
        }
