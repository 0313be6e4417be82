"""Continued pretraining: next-token loss on every token of raw text, packed into full-length blocks.

Documents are closed by EOS and concatenated, then cut into ``max_length`` blocks: no padding is wasted and no
token is dropped (the last, partial block is kept). Attention crosses document boundaries inside a block, as
in the original pretraining of GPT-style models; EOS tells the model where a document ended.
"""

from __future__ import annotations

import dataclasses
import logging

from ..data.batching import pack_blocks
from ..data.formats import Example, examples_of_kind
from ..data.template import Tokenized, tokenize_text
from .base import NextTokenObjective, ObjectiveConfig, register

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PretrainConfig(ObjectiveConfig):
    """Continued pretraining has no options of its own (the block length is the run's max_length)."""



@register
class Pretrain(NextTokenObjective):
    name = "pretrain"
    aliases = ("continued_pretraining", "clm", "causal_lm")
    kinds = ("text",)
    config_class = PretrainConfig
    config: PretrainConfig

    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[Tokenized]:
        examples = examples_of_kind(examples, self.kinds, "continued pretraining")
        docs = [tokenize_text(self.tokenizer, ex) for ex in examples]
        blocks, tail = pack_blocks(docs, max_length, source=examples[0].source.rsplit(":", 1)[0])
        total = sum(len(d) for d in docs)
        log.info("%s: %d documents, %d tokens packed into %d blocks of %d (last block %d tokens)", split,
                 len(docs), total, len(blocks), max_length, tail or max_length)
        return blocks
