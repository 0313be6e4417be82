"""Padding-free batches: several examples per row, attention that never crosses from one example to another.

A padded batch of examples with lengths 40, 310 and 95 computes 3 x 310 positions, 485 of them padding. A packed
batch puts the examples side by side in as few rows of at most ``capacity`` tokens as they need, filled evenly
(first-fit decreasing), gives each example its own position ids (0, 1, 2, ... restarting at every example; a
pretraining block restarts them at every document inside it) and passes **no** attention mask.
Transformers reads example boundaries from the restarting position ids (``masking_utils.find_packed_sequence_
indices``): SDPA and eager attention get a block-diagonal causal mask, flash-attention its variable-length kernel.
So every example sees exactly the tokens it would see alone, at the same positions: per-example losses and
gradients equal the unpacked ones (float rounding aside), which ``tests/test_packing.py`` checks for every method.

Labels stay aligned with ``input_ids`` (position t predicts ``labels[t + 1]``). The first token of every example
gets no label, so the last token of one example never learns to predict the next example's first token; alone,
that token is never predicted either. ``example_ids`` says which example each position belongs to (-1 for the
padding at the end of a row), so per-example sums (DPO's sequence log-probabilities, a reward model's last token)
read the packed batch as they read a padded one, with examples in the order given.
"""

from __future__ import annotations

from typing import Any

import torch

from .template import IGNORE_INDEX, Tokenized

PACKED_KEY = "example_ids"  # present exactly in packed batches
# What a vision-language model's forward reads besides the tokens (``tuneforge.vision`` puts them in the batch).
IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes", "mm_token_type_ids",
                "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into as few rows of at most ``capacity`` tokens as first-fit decreasing finds
    (within 11/9 of the optimum); an example longer than ``capacity`` gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def segment_bounds(example: Tokenized) -> list[tuple[int, int]]:
    """``(start, end)`` of each document inside ``example`` (one span unless it is a pretraining block)."""
    edges = [0, *example.segments, len(example.input_ids)]
    return list(zip(edges[:-1], edges[1:]))


def balanced_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """As few rows of at most ``capacity`` tokens as the examples need, filled evenly: the batch is as wide as its
    widest row, so 600 tokens under a capacity of 512 become two rows of ~300, not rows of 500 and 100."""
    needed = -(-sum(lengths) // capacity)
    width = min(capacity, max(max(lengths), -(-sum(lengths) // needed)))
    while True:
        rows = first_fit_decreasing(lengths, width)
        if len(rows) <= needed or width >= capacity:
            return rows
        width = min(capacity, width + max(1, width // 16))  # first-fit left a row over: a little more room


def pack_batch(examples: list[Tokenized], pad_token_id: int, capacity: int) -> dict:
    """``input_ids``, ``labels``, ``position_ids`` and ``example_ids``, all ``[rows, widest row]``, plus
    ``num_examples``: the examples packed into as few rows of at most ``capacity`` tokens as they need."""
    rows = balanced_rows([len(e.input_ids) for e in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    example_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            e = examples[i]
            ids[r, start:start + len(e.input_ids)] = torch.tensor(e.input_ids)
            for begin, end in segment_bounds(e):
                labels[r, start + begin + 1:start + end] = torch.tensor(e.labels[begin + 1:end])
                positions[r, start + begin:start + end] = torch.arange(end - begin)
            example_ids[r, start:start + len(e.input_ids)] = i
            start += len(e.input_ids)
        # Padding stays at position 0: every padding token is a segment of its own (a position after the model's
        # longest would be out of range), and no example attends to it.
    return {"input_ids": ids, "labels": labels, "position_ids": positions, PACKED_KEY: example_ids,
            "num_examples": len(examples)}


def collate_tokens(examples: list[Tokenized], pad_token_id: int, pack_capacity: int | None) -> dict:
    """The examples as one batch: packed into rows of ``pack_capacity`` tokens, or right-padded when it is None."""
    from .batching import pad_batch

    if examples[0].encoder is not None:  # text with images: the model's processor makes the batch (never packed)
        return examples[0].encoder.collate(examples)
    return pack_batch(examples, pad_token_id, pack_capacity) if pack_capacity else pad_batch(examples, pad_token_id)


def is_packed(batch: dict) -> bool:
    return PACKED_KEY in batch


def example_count(batch: dict) -> int:
    """Examples in the batch: its rows, or a packed batch's ``num_examples``."""
    return batch["num_examples"] if is_packed(batch) else batch["input_ids"].shape[0]


def real_tokens(batch: dict) -> int:
    """Tokens of the batch's examples, padding excluded (0 for a batch that is not made of token rows)."""
    if is_packed(batch):
        return int((batch[PACKED_KEY] >= 0).sum())
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0


def model_inputs(batch: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The keyword arguments a causal LM's forward takes for this batch: the attention mask of a padded batch, or
    the restarting position ids (and no mask) of a packed one."""
    inputs = {"input_ids": batch[f"{prefix}input_ids"]}
    inputs.update({key: batch[f"{prefix}{key}"] for key in IMAGE_INPUTS if f"{prefix}{key}" in batch})
    if f"{prefix}{PACKED_KEY}" in batch:
        inputs["position_ids"] = batch[f"{prefix}position_ids"]
    else:
        inputs["attention_mask"] = batch[f"{prefix}attention_mask"]
    return inputs


def example_index(batch: dict, prefix: str = "") -> tuple[torch.Tensor, int]:
    """``([rows, time] example of each position, number of examples)``: the row for a padded batch."""
    if f"{prefix}{PACKED_KEY}" in batch:
        return batch[f"{prefix}{PACKED_KEY}"], batch[f"{prefix}num_examples"]
    ids = batch[f"{prefix}input_ids"]
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    return rows, ids.shape[0]


def mask_reads_position_ids(cls: Any) -> bool:
    """Whether ``cls.forward`` hands ``position_ids`` to transformers' mask builder (where it finds packed examples).
    Read from the source: the keyword arguments of ``create_*causal_mask(...)`` / ``mask_function(...)`` or of a
    ``mask_kwargs = {...}`` dict; a forward that builds no mask this way is given the benefit of the doubt."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True
    calls = re.findall(r"(?:mask_kwargs\s*=\s*\{|causal_mask\(|mask_function\()([^)}]*)", source)
    calls = [c for c in calls if "**" not in c]  # create_causal_mask(**mask_kwargs): the dict is what counts
    return not calls or any("position_ids" in c for c in calls)


def model_packing_refusal(model) -> str | None:
    """Why ``model`` cannot read packed rows, or None. Transformers' own causal LMs build their attention masks
    with ``masking_utils.create_causal_mask``, which finds the examples of a row from the restarting position ids;
    a model with its own masking code (``trust_remote_code``, old releases) would let examples see each other."""
    import inspect
    import sys

    import transformers.masking_utils as masking

    if not hasattr(masking, "find_packed_sequence_indices"):
        return "this transformers release cannot read example boundaries from position ids"
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no position_ids"
    inner = getattr(model, "base_model", model)  # the decoder stack, where the mask is built
    for cls in (type(inner), type(model)):
        if getattr(sys.modules.get(cls.__module__), "create_causal_mask", None) is masking.create_causal_mask:
            if not mask_reads_position_ids(cls):
                return (f"{cls.__name__} builds its attention mask without the position ids (e.g. gpt-oss in "
                        "transformers 5), so packed examples would see each other")
            return None
    return f"{type(model).__name__} builds its own attention mask, which may not keep packed examples apart"
