"""Chat templates, and which tokens carry loss.

A conversation is rendered with the tokenizer's own chat template (or a named fallback when it has none). The
supervised characters are found by rendering prefixes of the conversation: an assistant turn is exactly what
``render(messages[:k+1])`` adds to ``render(messages[:k], add_generation_prompt=True)``. Tokens are then
labelled through the fast tokenizer's offset mapping, so this works for any template without knowing its
markup. The turn's closing end-of-turn token is supervised (the model must learn to stop); the newline a
template puts after it is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .formats import DataError, Example, Message, has_images

IGNORE_INDEX = -100

# Used when a tokenizer has no chat template. ChatML-style markers as plain text, closed by the tokenizer's EOS.
FALLBACK_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ message['content'] + '\n' }}{% endif %}"
        "{% endfor %}"
    ),
}


def ensure_chat_template(tokenizer, fallback: str = "chatml", override: str | None = None) -> None:
    """Give ``tokenizer`` a chat template: ``override`` if named, its own if it has one, else ``fallback``."""
    name = override or (None if getattr(tokenizer, "chat_template", None) else fallback)
    if name is None:
        return
    if name not in FALLBACK_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(FALLBACK_TEMPLATES)}")
    tokenizer.chat_template = FALLBACK_TEMPLATES[name]


def render_text(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of a prompt ready for generation (template + generation prompt)."""
    text = render_text(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    source: str
    segments: tuple[int, ...] = ()
    """Where further documents start inside ``input_ids`` (a pretraining block): a packed batch gives each document
    its own positions and attention; a padded one lets a block attend across them."""
    encoder: "ChatEncoder | None" = None
    """The encoder that made the example when it must also make the batch (a vision-language processor: the pixel
    tensors come with the tokens); None for text, which ``data.packing`` pads or packs itself."""

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def supervised_spans(tokenizer, messages: list[Message], text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` that carry loss: each assistant turn's content and its end-of-turn token."""
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_text(tokenizer, messages[:k], add_generation_prompt=True) if k else ""
        through = render_text(tokenizer, messages[: k + 1])
        if not text.startswith(through) or not through.startswith(before):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "use a fallback template (chat_template: chatml)")
        start, end = len(before), len(through)
        turn = text[start:end]
        eos = tokenizer.eos_token or ""
        stop = turn.rfind(eos) if eos else -1
        # Supervise up to the end of the turn's closing EOS, not the separator a template writes after it.
        if stop >= 0 and turn.find(message["content"]) <= stop:
            end = start + stop + len(eos)
        spans.append((start, end))
    return spans


class ChatEncoder:
    """What stands in for the tokenizer when records are more than text: a vision-language model's processor
    (``tuneforge.vision``) encodes a record's text and images together and makes the batch, pixel tensors included.
    Objectives keep calling ``tokenize_chat`` / ``tokenize_pair`` and ``collate_tokens``; those hand over to it."""

    image_token_ids: set[int] = set()
    """Token ids that stand for images (never labels; ``tuneforge data preview`` shows a run of them as a count)."""

    def encode_chat(self, example: Example, train_on_prompt: bool = False, supervise_from: int = 0) -> Tokenized:
        """As ``tokenize_chat``; only assistant turns at index >= ``supervise_from`` carry labels."""
        raise NotImplementedError

    def collate(self, examples: list[Tokenized]) -> dict[str, Any]:
        """Right-padded rows of the examples it encoded, with whatever else the model's forward reads."""
        raise NotImplementedError


def refuse_images(example: Example, messages: list[Message]) -> None:
    """A record with image parts reaching a text-only model's tokenizer: one line naming it."""
    if has_images(messages):
        raise DataError(f"{example.source}: the record has images, but the model is text-only (it has no vision "
                        "tower); train a vision-language model (docs/vision.md) or remove the image parts")


def tokenize_chat(tokenizer, example: Example, train_on_prompt: bool = False) -> Tokenized:
    """Token ids and labels of a chat example; labels are IGNORE_INDEX outside assistant turns."""
    if isinstance(tokenizer, ChatEncoder):
        return tokenizer.encode_chat(example, train_on_prompt)
    messages = example.messages
    refuse_images(example, messages)
    text = render_text(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    ends_with_answer = messages[-1]["role"] == "assistant" and bool(eos)
    if ends_with_answer and eos not in text[len(render_text(tokenizer, messages[:-1], True)):]:
        text += eos  # the template does not close answers: EOS must end each answer so the model learns to stop
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on_prompt:
        labels = list(ids)
    else:
        spans = supervised_spans(tokenizer, messages, text)
        if messages[-1]["role"] == "assistant" and spans and text.endswith(eos) and spans[-1][1] < len(text):
            spans[-1] = (spans[-1][0], len(text))
        labels = [tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX for tok, (a, _) in zip(ids, offsets)]
    result = Tokenized(ids, labels, example.source)
    if result.num_supervised == 0:
        raise DataError(f"{example.source}: the record has no supervised token (no assistant answer)")
    return result


def tokenize_text(tokenizer, example: Example) -> list[int]:
    """Raw text for continued pretraining: the text's tokens closed by EOS (documents stay separable)."""
    ids = tokenizer(example.text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
