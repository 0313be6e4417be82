"""Supervised / instruction fine-tuning: next-token loss on the assistant's answers only.

Every assistant turn of a multi-turn record is supervised; prompts, system text and padding are not (unless
``train_on_prompt``). The loss is the mean over all supervised tokens of the accumulated batch, so a long
answer weighs more than a short one, exactly as if the whole batch had been one forward pass.
"""

from __future__ import annotations

import dataclasses
import logging

from ..data.batching import apply_max_length
from ..data.formats import Example, examples_of_kind
from ..data.template import Tokenized, tokenize_chat
from .base import NextTokenObjective, ObjectiveConfig, register

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTConfig(ObjectiveConfig):
    """Options of supervised fine-tuning."""

    train_on_prompt: bool = False
    """Also put loss on the prompt, system and user tokens (default: the assistant's answers only)."""


@register
class SFT(NextTokenObjective):
    name = "sft"
    aliases = ("instruction", "supervised")
    kinds = ("chat",)
    config_class = SFTConfig
    config: SFTConfig

    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[Tokenized]:
        examples = examples_of_kind(examples, self.kinds, "supervised fine-tuning")
        items = [tokenize_chat(self.tokenizer, ex, self.config.train_on_prompt) for ex in examples]
        items, report = apply_max_length(items, max_length, self.config.max_length_policy)
        log.info("%s: %s", split, report.message(max_length))
        self.length_report = report
        return items
