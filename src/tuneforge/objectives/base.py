"""The contract every objective meets, and the batch shapes objectives share (log-probabilities: ``logprobs``).

An objective turns examples into batches and a batch into a loss. ``loss`` returns the loss **summed** over the
batch's units (supervised tokens for SFT / pretraining, pairs for DPO and reward modelling) and metric sums;
the trainer divides by the units of the whole accumulated batch, so gradient accumulation is exact: 4 micro-
batches of 2 give the update one batch of 8 gives.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.formats import Example
from ..data.template import IGNORE_INDEX
from ..options import Options
from ..registry import Registry



@dataclasses.dataclass
class ObjectiveConfig(Options):
    """Base class of an objective's options: a dataclass with one documented field per option."""

    kind: ClassVar[str] = "objective"
    objective: ClassVar[str] = ""

    max_length_policy: str = "drop"
    """What to do with records longer than max_length: drop, truncate or error (always counted and reported)."""
    seed: int = 0
    """Seeds the objective's own randomness (PPO's sampling); the trainer passes the run's seed."""

    @classmethod
    def owner_name(cls) -> str:
        return cls.objective


@dataclasses.dataclass
class TrainContext:
    """What an objective may need besides the batch."""

    handle: Any = None  # the method handle: ``handle.disabled()`` gives the reference model for DPO / PPO
    reference_model: nn.Module | None = None  # a separate frozen copy (full fine-tuning only)
    step: int = 0
    sum_across_ranks: Any = None  # sums a tensor over the ranks of a distributed run (PPO's rollout statistics)
    any_across_ranks: Any = None  # bool -> whether it holds on any rank (generation steps until every rank is done)

    def across_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank of a distributed run; itself on one process."""
        return tensor if self.sum_across_ranks is None else self.sum_across_ranks(tensor)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank of a distributed run; itself on one process."""
        return flag if self.any_across_ranks is None else self.any_across_ranks(flag)

    def reference(self):
        """Context manager + model computing the frozen reference policy."""
        import contextlib

        if self.reference_model is not None:
            return contextlib.nullcontext(self.reference_model)
        return _disabled(self.handle)


class _disabled:
    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        self.ctx = self.handle.disabled()
        self.ctx.__enter__()
        return self.handle.model

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


class Objective:
    """Base class: subclasses set ``name`` and implement ``prepare``, ``collate``, ``units`` and ``loss``.

    Every hook the trainer calls is declared here with its default; an objective overrides what it needs.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    flag_prefix: ClassVar[str] = ""
    """Prefix of the objective's options on the command line (``--dpo-beta 0.1``); default: the name."""
    kinds: ClassVar[tuple[str, ...]] = ()
    """Record kinds this objective trains on (see data.formats.Example.kind)."""
    needs_reference: ClassVar[bool] = False
    """The loss compares the policy with the frozen starting model (DPO, PPO): the adapter switched off, or a
    frozen copy when the method trains the base weights."""
    online: ClassVar[bool] = False
    """The objective makes its own training batches from the current policy (PPO's rollouts): the trainer hands
    it each batch of examples through ``rollout_steps`` instead of training on them directly."""
    length_report: Any = None
    """The max-length policy's counts (a ``data.batching.LengthReport``) of the last ``prepare``; None where nothing
    is ever dropped or cut (pretraining packs). A streaming run adds them up over its chunks."""

    packable: ClassVar[bool] = False
    """``collate`` can put several examples in one padding-free row (``data.packing``) with the losses and gradients
    of padded rows; the trainer turns it on through ``pack_capacity``."""

    def __init__(self, tokenizer, options: ObjectiveConfig | dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.pack_capacity: int | None = None  # tokens per packed row; None: padded rows
        self.config = options if isinstance(options, ObjectiveConfig) else self.config_class.from_dict(options or {})

    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[Any]:
        raise NotImplementedError

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss summed over the batch's units, and metric sums. Metrics may be detached 0-d tensors: the
        trainer adds them up on the device and reads them once per optimiser step, so no metric forces a sync."""
        raise NotImplementedError

    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        """Called once before training (e.g. DPO precomputes reference log-probs here)."""

    # -- online objectives (PPO): a rollout phase that feeds several optimiser steps ---------------------------
    def optimizer_steps_per_batch(self) -> int:
        """Optimiser steps one batch of examples becomes (the trainer sizes the run with it)."""
        return 1

    def rollout_steps(self, model: nn.Module, batch: dict[str, Any], ctx: TrainContext
                      ) -> list[list[dict[str, Any]]]:
        """An online objective's rollout on one collated batch of examples: the micro-batches of each optimiser
        step it feeds, in order."""
        raise NotImplementedError(f"{self.name} is not an online objective")

    # -- optional hooks for objectives that own trainable tensors (reward head, PPO value head) --------
    def extra_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters the objective trains besides the method's (the trainer adds them to AdamW)."""
        return []

    def training_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter state a checkpoint must carry to resume exactly (PPO's adaptive KL coefficient)."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``training_state`` returned."""

    def save(self, directory) -> None:
        """Write the objective's own files beside the adapter at the end of training (the reward head)."""


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, as TRL does by default for DPO, reward modelling and PPO: the policy
    and its reference must score a sequence identically, or the loss starts off its theoretical value."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


OBJECTIVES: Registry[Objective] = Registry("objective", "tuneforge.objectives")
register = OBJECTIVES.register
get_objective = OBJECTIVES.get
available_objectives = OBJECTIVES.names


class NextTokenObjective(Objective):
    """Shared by SFT and pretraining: token batches (packed or padded), loss = summed next-token cross-entropy."""

    packable = True

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        from ..data.packing import collate_tokens

        return collate_tokens(items, self.tokenizer.pad_token_id, self.pack_capacity)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        # Tokens that are predicted: the label at t+1 is supervised.
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        from ..models.logprobs import token_cross_entropy_sum

        loss_sum, _ = token_cross_entropy_sum(model, batch)
        return loss_sum, {"loss": loss_sum.detach()}


class PairObjective(Objective):
    """Shared by objectives on preference pairs (reward modelling, DPO): batches hold chosen rows then rejected
    rows, and the loss is averaged over pairs."""

    kinds: ClassVar[tuple[str, ...]] = ("preference",)
    purpose: ClassVar[str] = "preference training"
    packable = True

    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[Any]:
        from ..data.formats import examples_of_kind
        from ..data.preference import pairs_within, tokenize_pair

        examples = examples_of_kind(examples, self.kinds, self.purpose)
        items, report = pairs_within([tokenize_pair(self.tokenizer, ex) for ex in examples], max_length,
                                     self.config.max_length_policy)
        logging.getLogger(type(self).__module__).info("%s: %s", split, report.message(max_length))
        self.length_report = report
        return items

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        from ..data.preference import collate_pairs

        return collate_pairs(items, self.tokenizer.pad_token_id, self.pack_capacity)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        from ..data.packing import example_count

        return example_count(batch) // 2  # pairs: chosen and rejected examples
