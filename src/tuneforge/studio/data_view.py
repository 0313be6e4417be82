"""The Data tab's reading of a file, through the library's own readers: each record's format as the trainer detects
it, the rendered rows with their supervised tokens (``data.preview.marked_tokens``), token-length statistics, and
every record the trainer would refuse, as ``file:line: field`` messages."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..data.formats import DataError, Example, detect_format, normalise, read_rows
from ..data.preview import marked_tokens

MAX_ERRORS = 50


@dataclasses.dataclass
class DataReport:
    format: str
    records: int
    examples: list[Example]
    errors: list[str]
    lengths: list[int]

    def stats(self, max_length: int) -> dict[str, Any]:
        if not self.lengths:
            return {}
        lengths = np.asarray(self.lengths)
        return {"records read": self.records, "format": self.format, "tokens min": int(lengths.min()),
                "tokens median": int(np.median(lengths)), "tokens p95": int(np.percentile(lengths, 95)),
                "tokens max": int(lengths.max()), f"longer than max_length {max_length}":
                int((lengths > max_length).sum())}


def read_data(path: str, data_format: str = "auto", limit: int = 2000) -> DataReport:
    """Up to ``limit`` records of ``path``: the good ones normalised, the bad ones as error lines (the trainer stops
    at the first; the studio lists them all, up to MAX_ERRORS)."""
    fmt = None if data_format in ("", "auto") else data_format
    examples: list[Example] = []
    errors: list[str] = []
    count = 0
    rows = read_rows(path)
    while count < limit and len(errors) < MAX_ERRORS:
        try:
            location, row = next(rows)
        except StopIteration:
            break
        except (DataError, OSError, ValueError) as e:  # the file itself: malformed JSON on a line, not UTF-8
            errors.append(str(e))
            break
        count += 1
        try:
            fmt = fmt or detect_format(row, location)
            examples.append(normalise(row, fmt, location))
        except DataError as e:
            errors.append(str(e))
    return DataReport(fmt or "unknown", count, examples, errors, [])


def measure(report: DataReport, tokenizer, as_text: bool = False) -> None:
    """Token lengths of the report's examples as the trainer renders them (both answers of a pair count)."""
    report.lengths = [len(tokens) for example in report.examples for tokens in
                      (marked_tokens(tokenizer, view, as_text) for view in rendered_views(example))]


def rendered_views(example: Example) -> list[Example]:
    """What the loss sees of a record, as chat examples: a pair's chosen and rejected conversations, an unpaired
    record's one completion, a prompt as its prompt; chat and text records as they are."""
    if example.kind == "preference":
        return [dataclasses.replace(example, kind="chat", messages=example.messages + answer)
                for answer in (example.chosen, example.rejected)]
    if example.kind == "unpaired":
        return [dataclasses.replace(example, kind="chat", messages=example.messages + example.completion)]
    return [example]


def highlighted(tokenizer, example: Example, as_text: bool = False) -> list[tuple[str, str | None]]:
    """(text, label) runs for a highlighted-text view: "supervised" marks what the loss trains on; a pair shows
    its chosen answer, then its rejected one."""
    runs: list[tuple[str, str | None]] = []
    views = rendered_views(example)
    for number, view in enumerate(views):
        if len(views) > 1:
            runs.append((f"\n— {'chosen' if number == 0 else 'rejected'} —\n", "answer"))
        for text, supervised in marked_tokens(tokenizer, view, as_text):
            label = "supervised" if supervised else None
            if runs and runs[-1][1] == label:
                runs[-1] = (runs[-1][0] + text, label)
            else:
                runs.append((text, label))
    return runs
