"""``tuneforge data preview``: one rendered example with its supervised tokens marked, so the mask is visible."""

from __future__ import annotations

from .formats import load_examples
from .template import IGNORE_INDEX, ChatEncoder, ensure_chat_template, tokenize_chat, tokenize_text

START, END = "\x1b[42m\x1b[30m", "\x1b[0m"


def preview(path: str, model_name: str | None = None, index: int = 0, data_format: str = "auto",
            as_text: bool = False, chat_template: str | None = None, color: bool = False) -> str:
    """Render record ``index`` of ``path``; supervised text is wrapped in [[...]] (or highlighted in colour).

    ``as_text``: every token is supervised, as an objective that trains on plain text (pretraining) sees it; a
    text record is always shown so."""
    from ..models.loading import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(model_name or DEFAULT_MODEL)
    ensure_chat_template(tokenizer, override=chat_template)
    examples = load_examples(path, data_format, limit=index + 1)
    if index >= len(examples):
        raise ValueError(f"{path}: has only {len(examples)} records; --index {index} is out of range")
    example = examples[index]
    tokens = marked_tokens(tokenizer, example, as_text)
    open_mark, close_mark = (START, END) if color else ("[[", "]]")
    pieces, inside = [], False
    for text, supervised, run in image_runs(tokens, image_texts(tokenizer)):
        if supervised != inside:
            pieces.append(open_mark if supervised else close_mark)
            inside = supervised
        pieces.append(f"{text}x{run}" if run > 1 else text)
    if inside:
        pieces.append(close_mark)
    n_sup = sum(supervised for _, supervised in tokens)
    header = (f"{example.source}  ({len(tokens)} tokens, {n_sup} supervised; supervised text is "
              f"{'highlighted' if color else 'between [[ and ]]'})")
    return header + "\n" + "".join(pieces)


def marked_tokens(tokenizer, example, as_text: bool = False) -> list[tuple[str, bool]]:
    """Each token of the rendered example as (its text, whether the loss supervises it): what ``preview`` marks and
    the studio highlights. ``as_text``: as ``preview``'s."""
    if example.kind == "text" or as_text:
        ids = tokenize_text(tokenizer, example)
        labels = list(ids)
    else:
        tokenized = tokenize_chat(tokenizer, example)
        ids, labels = tokenized.input_ids, tokenized.labels
    return [(tokenizer.decode([tok]), label != IGNORE_INDEX) for tok, label in zip(ids, labels)]


def image_texts(tokenizer) -> set[str]:
    """The text of a vision-language model's image tokens (none for a text model)."""
    ids = tokenizer.image_token_ids if isinstance(tokenizer, ChatEncoder) else set()
    return {tokenizer.decode([tok]) for tok in ids}


def image_runs(tokens: list[tuple[str, bool]], images: set[str]) -> list[tuple[str, bool, int]]:
    """``tokens`` with each run of one image token (tens or hundreds per image) as one piece and its count."""
    out: list[tuple[str, bool, int]] = []
    for text, supervised in tokens:
        if out and text in images and out[-1][0] == text and out[-1][1] == supervised:
            out[-1] = (text, supervised, out[-1][2] + 1)
        else:
            out.append((text, supervised, 1))
    return out
