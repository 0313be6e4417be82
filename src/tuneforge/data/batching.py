"""Batches out: length limits (counted, never silent), packing of raw text, padding."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from .formats import DataError
from .template import IGNORE_INDEX, Tokenized

log = logging.getLogger(__name__)
class HasSource(Protocol):
    @property
    def source(self) -> str:  # file:line, for messages
        ...


T = TypeVar("T", bound=HasSource)


@dataclass
class LengthReport:
    """What ``enforce_max_length`` did, so callers can print it."""

    total: int = 0
    too_long: int = 0
    truncated: int = 0
    dropped: int = 0
    longest: int = 0
    sources: list[str] = field(default_factory=list)  # the first few over-long records

    def add(self, chunk: "LengthReport | None", examples: int) -> None:
        """Count a further chunk of the same data (streaming reads it a chunk at a time); a chunk without a report
        (pretraining keeps every token) adds its examples only."""
        if chunk is None:
            self.total += examples
            return
        for name in ("total", "too_long", "truncated", "dropped"):
            setattr(self, name, getattr(self, name) + getattr(chunk, name))
        self.longest = max(self.longest, chunk.longest)
        self.sources = (self.sources + chunk.sources)[:4]  # the first few, as one report keeps

    def message(self, max_length: int) -> str:
        if not self.too_long:
            return f"{self.total} examples, all within max_length={max_length} (longest {self.longest} tokens)"
        where = ", ".join(self.sources[:3]) + (" ..." if len(self.sources) > 3 else "")
        return (f"{self.too_long} of {self.total} examples are longer than max_length={max_length} (longest "
                f"{self.longest}): {self.truncated} truncated, {self.dropped} dropped; e.g. {where}")


POLICIES = ("drop", "truncate", "error")


def enforce_max_length(items: list[T], max_length: int, policy: str, *, length: Callable[[T], int],
                       cut: Callable[[T], T | None] | None, what: str = "example", room: int = 0
                       ) -> tuple[list[T], LengthReport]:
    """The one max-length policy, for examples, preference pairs and prompts alike: keep what fits, and of the
    rest raise on the first (``error``), keep ``cut(item)`` (``truncate``; ``None`` when the cut leaves nothing to
    learn from) or drop it. Every over-long item is counted in the report, never silently lost.

    ``room`` tokens must stay free after an item (a prompt needs room for at least one answer token)."""
    if policy not in POLICIES:
        raise ValueError(f"max-length policy must be drop, truncate or error, got {policy!r}")
    report = LengthReport(total=len(items))
    kept = []
    for item in items:
        n = length(item)
        report.longest = max(report.longest, n)
        if n + room <= max_length:
            kept.append(item)
            continue
        report.too_long += 1
        report.sources.append(f"{item.source} ({n} tokens)")
        if policy == "error":
            needs = f" (+{room} to answer)" if room else ""
            raise DataError(f"{item.source}: {n} tokens{needs} is longer than max_length={max_length}")
        shorter = cut(item) if policy == "truncate" and cut is not None else None
        if shorter is not None:
            report.truncated += 1
            kept.append(shorter)
        else:
            report.dropped += 1
    if report.too_long:
        log.warning(report.message(max_length))
    if not kept:
        raise DataError(f"no {what} fits max_length={max_length}: {report.message(max_length)}")
    return kept, report


def truncated(example: Tokenized, max_length: int) -> Tokenized | None:
    """The first ``max_length`` tokens, or ``None`` when they hold no supervised token (nothing to learn)."""
    cut = Tokenized(example.input_ids[:max_length], example.labels[:max_length], example.source)
    return cut if cut.num_supervised > 0 else None


def apply_max_length(examples: list[Tokenized], max_length: int, policy: str = "drop") -> tuple[list[Tokenized],
                                                                                                LengthReport]:
    """Enforce ``max_length`` on tokenized examples: drop, truncate (a cut that loses every supervised token is
    dropped and counted as dropped) or error."""
    return enforce_max_length(examples, max_length, policy, length=lambda ex: len(ex.input_ids),
                              cut=lambda ex: truncated(ex, max_length))


def pack_blocks(token_lists: list[list[int]], block_size: int, source: str = "") -> tuple[list[Tokenized], int]:
    """Concatenate documents (each already closed by EOS) and cut the stream into ``block_size`` blocks.

    This is how language models are pretrained: no padding is wasted. The final partial block is kept (shorter)
    rather than dropped, so no token is lost. Each block records where documents start inside it (``segments``),
    so a packed batch keeps documents apart. Returns the blocks and the number of tokens in the partial block.
    """
    stream = [t for ids in token_lists for t in ids]
    starts, offset = [], 0
    for ids in token_lists:
        starts.append(offset)
        offset += len(ids)
    blocks: list[Tokenized] = []
    for start in range(0, len(stream), block_size):
        ids = stream[start:start + block_size]
        first, end = bisect.bisect_right(starts, start), bisect.bisect_left(starts, start + len(ids))
        inside = tuple(s - start for s in starts[first:end])
        blocks.append(Tokenized(ids, list(ids), f"{source}:block {len(blocks)}", inside))
    tail = len(stream) % block_size
    return blocks, tail


def pad_batch(examples: list[Tokenized], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad to the longest example: input_ids, attention_mask and labels (IGNORE_INDEX on padding)."""
    longest = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation (new tokens then line up at the right edge)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, longest - len(s):] = torch.tensor(s)
            mask[i, longest - len(s):] = 1
    return ids, mask


def to_device(batch: dict, device: torch.device | str, non_blocking: bool = False) -> dict:
    """The batch with its tensors on ``device`` (counts such as a packed batch's ``num_examples`` stay ints)."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
