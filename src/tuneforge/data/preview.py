"""``tuneforge data preview``: one rendered example with its supervised tokens marked, so the mask is visible."""

from __future__ import annotations

from .formats import load_examples
from .template import IGNORE_INDEX, ensure_chat_template, tokenize_chat, tokenize_text

START, END = "\x1b[42m\x1b[30m", "\x1b[0m"


def preview(path: str, model_name: str | None = None, index: int = 0, data_format: str = "auto",
            objective: str | None = None, chat_template: str | None = None, color: bool = False) -> str:
    """Render record ``index`` of ``path``; supervised text is wrapped in [[...]] (or highlighted in colour)."""
    from ..models.loading import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(model_name or DEFAULT_MODEL)
    ensure_chat_template(tokenizer, override=chat_template)
    examples = load_examples(path, data_format, limit=index + 1)
    if index >= len(examples):
        raise ValueError(f"{path}: has only {len(examples)} records; --index {index} is out of range")
    example = examples[index]
    if example.kind == "text" or objective == "pretrain":
        ids = tokenize_text(tokenizer, example)
        labels = list(ids)
    else:
        tokenized = tokenize_chat(tokenizer, example)
        ids, labels = tokenized.input_ids, tokenized.labels
    open_mark, close_mark = (START, END) if color else ("[[", "]]")
    pieces, inside = [], False
    for tok, label in zip(ids, labels):
        supervised = label != IGNORE_INDEX
        if supervised != inside:
            pieces.append(open_mark if supervised else close_mark)
            inside = supervised
        pieces.append(tokenizer.decode([tok]))
    if inside:
        pieces.append(close_mark)
    n_sup = sum(1 for x in labels if x != IGNORE_INDEX)
    header = (f"{example.source}  ({len(ids)} tokens, {n_sup} supervised; supervised text is "
              f"{'highlighted' if color else 'between [[ and ]]'})")
    return header + "\n" + "".join(pieces)
