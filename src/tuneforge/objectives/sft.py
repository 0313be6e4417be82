"""Supervised / instruction fine-tuning: next-token loss on the assistant's answers only.

Every assistant turn of a multi-turn record is supervised; prompts, system text and padding are not (unless
``train_on_prompt``). The loss is the mean over all supervised tokens of the accumulated batch, so a long
answer weighs more than a short one, exactly as if the whole batch had been one forward pass.
"""

from __future__ import annotations

import logging

from ..data.batching import apply_max_length
from ..data.formats import Example, examples_of_kind
from ..data.template import Tokenized, tokenize_chat
from .base import NextTokenObjective, register

log = logging.getLogger(__name__)


@register
class SFT(NextTokenObjective):
    name = "sft"
    aliases = ("instruction", "supervised")
    kinds = ("chat",)

    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[Tokenized]:
        examples = examples_of_kind(examples, self.kinds, "supervised fine-tuning")
        train_on_prompt = bool(self.options.get("train_on_prompt", False))
        items = [tokenize_chat(self.tokenizer, ex, train_on_prompt) for ex in examples]
        items, report = apply_max_length(items, max_length, self.options.get("max_length_policy", "drop"))
        log.info("%s: %s", split, report.message(max_length))
        self.length_report = report
        return items
