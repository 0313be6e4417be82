"""The Data tab's reading of a file: every bad record as file:line: field (the trainer stops at the first), the
format as the trainer detects it, supervised tokens as the trainer labels them, lengths."""

from __future__ import annotations

import json

from tuneforge.data.preview import marked_tokens
from tuneforge.data.template import ensure_chat_template
from tuneforge.studio.data_view import highlighted, measure, read_data


def write(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def test_every_bad_record_is_listed_with_its_line(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"},
                                        {"instruction": "d", "output": 3}, {"instruction": "e", "output": "f"}])
    report = read_data(str(path))
    assert report.format == "alpaca" and report.records == 4 and len(report.examples) == 2
    assert report.errors == [f"{path}:2: field 'output' is missing",
                             f"{path}:3: field 'output' must be a string, got int"]


def test_a_malformed_line_stops_the_reading_with_its_line(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a"}, "{not json\n", {"text": "b"}])
    report = read_data(str(path))
    assert len(report.examples) == 1 and report.errors[0].startswith(f"{path}:2: malformed JSON")


def test_supervised_tokens_are_the_trainers_and_lengths_are_measured(tmp_path, tokenizer):
    ensure_chat_template(tokenizer)
    path = write(tmp_path / "d.jsonl", [{"instruction": "Say 5 in words.", "output": "five"}])
    report = read_data(str(path))
    measure(report, tokenizer)
    runs = highlighted(tokenizer, report.examples[0])
    assert "".join(text for text, label in runs if label == "supervised").startswith("five")
    assert report.lengths == [len(marked_tokens(tokenizer, report.examples[0]))]
    assert report.stats(4)["longer than max_length 4"] == 1


def test_a_preference_pair_shows_both_answers(tmp_path, tokenizer):
    ensure_chat_template(tokenizer)
    path = write(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    report = read_data(str(path))
    assert report.format == "preference"
    runs = highlighted(tokenizer, report.examples[0])
    labelled = [(text.strip(), label) for text, label in runs if label]
    assert ("— chosen —", "answer") in labelled and ("— rejected —", "answer") in labelled
    supervised = [text for text, label in runs if label == "supervised"]
    assert supervised[0].startswith("Hello!") and supervised[1].startswith("Go away.")
