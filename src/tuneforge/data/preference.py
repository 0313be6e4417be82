"""Preference pairs and prompts as token ids, for reward modelling, DPO and PPO.

A response is tokenised after its prompt the way TRL does it: the prompt is rendered with the chat template and
its generation prompt, the response is what the template adds after that, and the two are tokenised
separately and concatenated. So chosen and rejected share exactly the same prompt tokens, only the response
carries labels, and a PPO rollout (prompt ids + sampled ids) has the layout DPO and the reward model train on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .batching import LengthReport, enforce_max_length, truncated
from .packing import collate_tokens
from .formats import DataError, Example, Message
from .template import IGNORE_INDEX, Tokenized, prompt_ids, render_text


@dataclass
class PairItem:
    """A tokenised preference pair."""

    chosen: Tokenized
    rejected: Tokenized
    source: str
    margin: float | None = None  # TRL's optional per-record reward margin
    ref_logps: tuple[float, float] | None = None  # (chosen, rejected) reference log-probs, when DPO precomputes them


@dataclass
class PromptItem:
    """A tokenised prompt for PPO rollouts; ``fields`` are the record's other columns (passed to reward functions)."""

    input_ids: list[int]
    messages: list[Message]
    source: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """What a reward function sees as the prompt: the record's ``prompt`` string, else the last user turn."""
        prompt = self.fields.get("prompt")
        return prompt if isinstance(prompt, str) else self.messages[-1]["content"]


def response_text(tokenizer, prompt: list[Message], response: list[Message], source: str = "") -> str:
    """The text the chat template writes for ``response`` after ``prompt``'s generation prompt, closed by EOS."""
    before = render_text(tokenizer, prompt, add_generation_prompt=True)
    full = render_text(tokenizer, prompt + response)
    if not full.startswith(before):
        raise DataError(f"{source}: the chat template does not render the answer after the prompt's generation "
                        "prompt; use a fallback template (chat_template: chatml)")
    text = full[len(before):]
    eos = tokenizer.eos_token or ""
    if eos:
        stop = text.rfind(eos)
        # The closing EOS is part of the answer (the model learns to stop); a separator after it is not.
        text = text[:stop + len(eos)] if stop >= 0 else text + eos
    return text


def tokenize_response(tokenizer, prompt: list[Message], response: list[Message], source: str,
                      prompt_token_ids: list[int] | None = None) -> Tokenized:
    """Prompt ids (no loss) followed by the response ids (labelled)."""
    p_ids = prompt_token_ids if prompt_token_ids is not None else prompt_ids(tokenizer, prompt)
    r_ids = tokenizer(response_text(tokenizer, prompt, response, source), add_special_tokens=False)["input_ids"]
    if not r_ids:
        raise DataError(f"{source}: the response is empty after tokenisation")
    return Tokenized(p_ids + r_ids, [IGNORE_INDEX] * len(p_ids) + r_ids, source)


def _margin(example: Example) -> float | None:
    value = example.fields.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{example.source}: field 'margin' must be a finite number, got {value!r}")
    return float(value)


def tokenize_pair(tokenizer, example: Example) -> PairItem:
    p_ids = prompt_ids(tokenizer, example.messages)
    chosen = tokenize_response(tokenizer, example.messages, example.chosen, f"{example.source}: field 'chosen'", p_ids)
    rejected = tokenize_response(tokenizer, example.messages, example.rejected,
                                 f"{example.source}: field 'rejected'", p_ids)
    return PairItem(chosen, rejected, example.source, _margin(example))


def tokenize_prompt(tokenizer, example: Example) -> PromptItem:
    return PromptItem(prompt_ids(tokenizer, example.messages), example.messages, example.source, example.fields)


def pairs_within(items: list[PairItem], max_length: int, policy: str = "drop") -> tuple[list[PairItem], LengthReport]:
    """Enforce ``max_length`` on both sides of each pair: drop, truncate (keeping >= 1 response token) or error."""
    def cut(item: PairItem) -> PairItem | None:
        chosen, rejected = truncated(item.chosen, max_length), truncated(item.rejected, max_length)
        if chosen is None or rejected is None:
            return None  # a side lost every response token
        return PairItem(chosen, rejected, item.source, item.margin)

    return enforce_max_length(items, max_length, policy, what="preference pair", cut=cut,
                              length=lambda item: max(len(item.chosen.input_ids), len(item.rejected.input_ids)))


def prompts_within(items: list[PromptItem], max_length: int, policy: str = "drop"
                   ) -> tuple[list[PromptItem], LengthReport]:
    """Prompts that leave no room to answer under ``max_length`` are dropped or raise (a question is never cut)."""
    return enforce_max_length(items, max_length, policy, what="prompt", cut=None, room=1,
                              length=lambda item: len(item.input_ids))


def collate_pairs(items: list[PairItem], pad_token_id: int, pack_capacity: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """One batch of the chosen examples, then the rejected ones (one forward pass scores both, as TRL): right-padded
    rows, or packed into rows of ``pack_capacity`` tokens."""
    examples = [i.chosen for i in items] + [i.rejected for i in items]
    batch = collate_tokens(examples, pad_token_id, pack_capacity)
    if any(i.margin is not None for i in items):  # a record without a margin has margin 0
        batch["margin"] = torch.tensor([i.margin or 0.0 for i in items], dtype=torch.float32)
    refs = [i.ref_logps for i in items if i.ref_logps is not None]
    if len(refs) == len(items):
        batch["ref_chosen_logps"] = torch.tensor([r[0] for r in refs], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([r[1] for r in refs], dtype=torch.float32)
    return batch
