"""The contract every objective meets, and the log-probability helpers they share.

An objective turns examples into batches and a batch into a loss. ``loss`` returns the loss **summed** over the
batch's units (supervised tokens for SFT / pretraining, pairs for DPO and reward modelling) and metric sums;
the trainer divides by the units of the whole accumulated batch, so gradient accumulation is exact: 4 micro-
batches of 2 give the update one batch of 8 gives.

Logits are computed only where a loss needs them: transformers' ``logits_to_keep`` takes a boolean mask of
positions, so the vocabulary projection (a large share of a small model's compute) and its float32 logits
never touch prompt or padding positions.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.formats import Example
from ..data.template import IGNORE_INDEX

_REGISTRY: dict[str, type["Objective"]] = {}


@dataclasses.dataclass
class TrainContext:
    """What an objective may need besides the batch."""

    handle: Any = None  # the method handle: ``handle.disabled()`` gives the reference model for DPO / PPO
    reference_model: nn.Module | None = None  # a separate frozen copy (full fine-tuning only)
    step: int = 0

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
    """Base class: subclasses set ``name`` and implement ``prepare``, ``collate``, ``units`` and ``loss``."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    # Record kinds this objective trains on (see data.formats.Example.kind).
    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tokenizer, options: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.options = options or {}

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


@dataclasses.dataclass
class ObjectiveConfig:
    """Base class of an objective's options: a dataclass with one documented field per option."""

    objective: ClassVar[str] = ""

    max_length_policy: str = "drop"
    """What to do with records longer than max_length: drop, truncate or error (always counted and reported)."""
    seed: int = 0
    """Seeds the objective's own randomness (PPO's sampling); the trainer passes the run's seed."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ObjectiveConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown option(s) for objective {cls.objective!r}: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**values)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, as TRL does by default for DPO, reward modelling and PPO: the policy
    and its reference must score a sequence identically, or the loss starts off its theoretical value."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def register(cls: type[Objective]) -> type[Objective]:
    for name in (cls.name, *cls.aliases):
        _REGISTRY[name.replace("-", "_").lower()] = cls
    return cls


def get_objective(name: str) -> type[Objective]:
    from . import _load_all  # noqa: F401

    key = name.replace("-", "_").lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(available_objectives())}")
    return _REGISTRY[key]


def available_objectives() -> list[str]:
    from . import _load_all  # noqa: F401

    return sorted({c.name for c in _REGISTRY.values()})


# -- shared log-probability helpers ---------------------------------------------------------------------


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model computes logits only at a boolean mask of positions (transformers >= 5.2x)."""
    cached = getattr(model, "_tuneforge_logits_to_keep", None)
    if cached is None:
        import transformers.modeling_utils as mu

        # Older releases accept an int / index tensor only; a 2-D bool mask needs their slice_logits_to_keep.
        cached = ("logits_to_keep" in inspect.signature(model.forward).parameters
                  and hasattr(mu, "slice_logits_to_keep"))
        model._tuneforge_logits_to_keep = cached
    return cached


def target_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a supervised label, flattened: ``([n, vocab], [n] targets)``.

    ``labels`` are aligned with ``input_ids`` (HF convention): position t predicts ``labels[t + 1]``.
    """
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    if _accepts_logits_to_keep(model):
        try:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        except IndexError:  # a release that indexes hidden states with logits_to_keep as a 1-D slice
            model._tuneforge_logits_to_keep = False
        else:
            if logits.dim() == 2:  # transformers gathered only the kept positions
                return logits, labels[:, 1:][keep[:, :-1]]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[keep], labels[:, 1:][keep[:, :-1]]


def token_cross_entropy_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised tokens, and their count."""
    logits, targets = target_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, int(targets.numel())


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each row's supervised tokens: ``[batch]`` (DPO's sequence log-probability)."""
    logits, targets = target_logits(model, input_ids, attention_mask, labels)
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels[:, 1:])
    row_of_token = rows[labels[:, 1:] != IGNORE_INDEX]
    return torch.zeros(labels.shape[0], device=token_logps.device, dtype=token_logps.dtype).index_add(
        0, row_of_token, token_logps)


class NextTokenObjective(Objective):
    """Shared by SFT and pretraining: padded token batches, loss = summed next-token cross-entropy."""

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        from ..data.batching import pad_batch

        return pad_batch(items, self.tokenizer.pad_token_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        # Tokens that are predicted: the label at t+1 is supervised.
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum, _ = token_cross_entropy_sum(model, batch)
        return loss_sum, {"loss": loss_sum.detach()}


class PairObjective(Objective):
    """Shared by objectives on preference pairs (reward modelling, DPO): batches hold chosen rows then rejected
    rows, and the loss is averaged over pairs."""

    kinds: ClassVar[tuple[str, ...]] = ("preference",)
    purpose: ClassVar[str] = "preference training"

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

        return collate_pairs(items, self.tokenizer.pad_token_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs
