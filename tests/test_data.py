"""Records in: format detection from every file type, validation errors that name file / line / field, length
policies that count what they do, and packing that keeps every token."""

from __future__ import annotations

import copy
import csv
import json
import logging

import pytest

from conftest import write_jsonl
from tuneforge.data.batching import apply_max_length, pack_blocks, pad_batch
from tuneforge.data.formats import DataError, detect_format, load_examples
from tuneforge.data.template import IGNORE_INDEX, Tokenized, ensure_chat_template
from tuneforge.objectives import get_objective

pytestmark = pytest.mark.usefixtures("single_thread")

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}
PREFERENCE = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}
PROMPT = {"prompt": "Tell me a joke."}
PROMPT_MESSAGES = {"messages": [{"role": "system", "content": "Be funny."}, {"role": "user", "content": "A joke?"}]}

# (format, record, the Example kind it becomes, file types that can hold it: CSV holds only flat strings)
CASES = [
    ("alpaca", ALPACA, "chat", ("jsonl", "json", "csv", "parquet")),
    ("messages", MESSAGES, "chat", ("jsonl", "json", "parquet")),
    ("sharegpt", SHAREGPT, "chat", ("jsonl", "json", "parquet")),
    ("text", TEXT, "text", ("jsonl", "json", "csv", "parquet")),
    ("preference", PREFERENCE, "preference", ("jsonl", "json", "csv", "parquet")),
    ("prompt", PROMPT, "prompt", ("jsonl", "json", "csv", "parquet")),
    ("prompt", PROMPT_MESSAGES, "prompt", ("jsonl", "json", "parquet")),
]


def write_rows(path, rows):
    kind = path.suffix[1:]
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt,record,kind,suffixes", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_detection_from_every_file_type(tmp_path, fmt, record, kind, suffixes):
    for suffix in suffixes:
        path = write_rows(tmp_path / f"data.{suffix}", [record, record])
        assert detect_format(record) == fmt
        examples = load_examples(path)
        assert len(examples) == 2, suffix
        ex = examples[1]
        assert ex.kind == kind, suffix
        assert ex.source.startswith(str(path)), suffix
        assert ex.source != examples[0].source  # each record knows its own place in the file
        if kind == "chat":
            assert ex.messages[-1]["role"] == "assistant" and ex.messages[-1]["content"] in ("5", "Hello")
        if kind == "text":
            assert ex.text == TEXT["text"]
        if kind == "preference":
            assert ex.messages[-1] == {"role": "user", "content": "Say hi."}
            assert ex.chosen == [{"role": "assistant", "content": "Hi!"}]
            assert ex.rejected == [{"role": "assistant", "content": "Go away."}]
        if kind == "prompt":
            assert ex.messages[-1]["role"] == "user"


def test_record_fields_are_kept_and_lines_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n\n" + json.dumps({**ALPACA, "id": 7}) + "\n")
    examples = load_examples(path)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]  # blank lines skipped, still counted
    assert examples[1].fields["id"] == 7
    csv_examples = load_examples(write_rows(tmp_path / "d.csv", [ALPACA, ALPACA]))
    assert csv_examples[0].source == f"{tmp_path / 'd.csv'}:2"  # line 1 is the header


def test_alpaca_input_system_and_history(tmp_path):
    row = {"system": "Answer briefly.", "history": [["Hi", "Hello"], ["2+2?", "4"]],
           "instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    (ex,) = load_examples(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert ex.messages == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"},
    ]
    (plain,) = load_examples(write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Hi", "output": "Hello"}]))
    assert plain.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_sharegpt_roles_are_mapped(tmp_path):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}]}
    (ex,) = load_examples(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]


def test_conversational_preference_without_prompt_key(tmp_path):
    user = {"role": "user", "content": "Say hi."}
    row = {"chosen": [user, {"role": "assistant", "content": "Hi!"}],
           "rejected": [user, {"role": "assistant", "content": "No."}]}
    (ex,) = load_examples(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert ex.kind == "preference" and ex.messages == [user]
    assert ex.chosen[0]["content"] == "Hi!" and ex.rejected[0]["content"] == "No."


# -- errors name the file, the line and the field ----------------------------------------------------------


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError, match=f"{path}:3: malformed JSON"):
        load_examples(path)
    path.write_text(json.dumps(ALPACA) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=f"{path}:2: expected a JSON object"):
        load_examples(path)


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=f"{path}:3: malformed JSON"):
        load_examples(path)


@pytest.mark.parametrize("row,field,problem", [
    ({"instruction": "x", "output": None}, "'output'", "is missing"),
    ({"instruction": "x", "output": 5}, "'output'", "must be a string, got int"),
    ({"instruction": ["x"], "output": "y"}, "'instruction'", "must be a string, got list"),
    ({"instruction": "x", "output": "y", "history": [["only one"]]}, "'history[0]'", "pair of strings"),
])
def test_alpaca_validation_names_line_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, row])
    with pytest.raises(DataError) as e:
        load_examples(path)
    message = str(e.value)
    assert message.startswith(f"{path}:2:") and field in message and problem in message


def test_missing_output_in_later_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, ALPACA, {"instruction": "no answer"}])
    with pytest.raises(DataError, match=f"{path}:3: field 'output' is missing"):
        load_examples(path)


def test_unknown_role_names_message_index(tmp_path):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "robot", "content": "c"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [MESSAGES, row])
    with pytest.raises(DataError) as e:
        load_examples(path)
    message = str(e.value)
    assert f"{path}:2" in message and "messages[2]" in message and "robot" in message


def test_message_content_must_be_string(tmp_path):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'messages\[1\]'.content must be a string"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [row]))


def test_undetectable_record_and_bad_files(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "?", "answer": "!"}])
    with pytest.raises(DataError, match=f"{path}:1: cannot tell the record's format"):
        load_examples(path)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_examples(tmp_path / "missing.jsonl")
    other = tmp_path / "d.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_examples(other)
    with pytest.raises(DataError, match="unknown data format"):
        load_examples(path, "yaml")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_examples(empty)


def test_sft_refuses_wrong_kind(tmp_path, tokenizer):
    examples = load_examples(write_jsonl(tmp_path / "t.jsonl", [TEXT]))
    objective = get_objective("sft")(tokenizer)
    with pytest.raises(DataError, match=r"t.jsonl:1: a 'text' record cannot be used for supervised fine-tuning"):
        objective.prepare(examples, 64)


# -- max_length: counted and reported, never silent --------------------------------------------------------


def _items(lengths, supervised_from=0):
    return [Tokenized(list(range(1, n + 1)), [IGNORE_INDEX] * supervised_from + list(range(supervised_from + 1, n + 1)),
                      f"f.jsonl:{i + 1}") for i, n in enumerate(lengths)]


def test_max_length_drop(caplog):
    with caplog.at_level(logging.WARNING):
        kept, report = apply_max_length(_items([5, 12, 8, 20]), 10, "drop")
    assert [len(k.input_ids) for k in kept] == [5, 8]
    assert (report.total, report.too_long, report.dropped, report.truncated, report.longest) == (4, 2, 2, 0, 20)
    assert report.total == len(kept) + report.dropped + 0  # nothing lost without being counted
    assert "f.jsonl:2 (12 tokens)" in report.message(10) and "2 dropped" in report.message(10)
    assert "longer than max_length=10" in caplog.text


def test_max_length_truncate_counts_and_drops_unsupervised():
    # Record 3 supervises only from token 15 on: cut to 10 tokens it teaches nothing, so it is dropped (counted).
    items = _items([5, 12]) + _items([20], supervised_from=15)
    kept, report = apply_max_length(items, 10, "truncate")
    assert [len(k.input_ids) for k in kept] == [5, 10]
    assert kept[1].labels == list(range(1, 11))
    assert (report.too_long, report.truncated, report.dropped) == (2, 1, 1)
    assert report.total == len(kept) + report.dropped


def test_max_length_error_names_record():
    with pytest.raises(DataError, match=r"f.jsonl:2: 12 tokens is longer than max_length=10"):
        apply_max_length(_items([5, 12]), 10, "error")
    with pytest.raises(DataError, match="no example fits"):
        apply_max_length(_items([12, 13]), 10, "drop")
    with pytest.raises(ValueError, match="policy"):
        apply_max_length(_items([5]), 10, "ignore")


def test_sft_prepare_reports_lengths(tmp_path, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    ensure_chat_template(tokenizer)
    rows = [{"instruction": "Hi", "output": "five"}, {"instruction": "Hi", "output": " ".join(["five"] * 40)}]
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    sft = get_objective("sft")(tokenizer, {"max_length_policy": "drop"})
    items = sft.prepare(examples, 24)
    assert len(items) == 1 and sft.length_report.dropped == 1 and sft.length_report.too_long == 1
    truncating = get_objective("sft")(tokenizer, {"max_length_policy": "truncate"})
    items = truncating.prepare(examples, 24)
    assert [len(i.input_ids) for i in items][1] == 24 and truncating.length_report.truncated == 1
    with pytest.raises(DataError, match=r"d.jsonl:2: \d+ tokens is longer than max_length=24"):
        get_objective("sft")(tokenizer, {"max_length_policy": "error"}).prepare(examples, 24)


# -- packing and padding -----------------------------------------------------------------------------------


def test_pack_blocks_keeps_every_token():
    docs = [list(range(100 + 10 * i, 100 + 10 * i + n)) for i, n in enumerate([3, 7, 1, 11, 5])]
    blocks, tail = pack_blocks(docs, 8, "f.jsonl")
    stream = [t for d in docs for t in d]
    assert sum(len(b.input_ids) for b in blocks) == len(stream) == 27
    assert [t for b in blocks for t in b.input_ids] == stream  # in order, nothing lost or repeated
    assert [len(b.input_ids) for b in blocks] == [8, 8, 8, 3] and tail == 3
    assert all(b.labels == b.input_ids for b in blocks)


def test_pretrain_objective_packs_all_tokens(tmp_path, tokenizer):
    texts = [" ".join(["word"] * n) + " end." for n in (3, 17, 40, 1, 9)]
    examples = load_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]))
    pretrain = get_objective("pretrain")(tokenizer)
    blocks = pretrain.prepare(examples, 16)
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    total = sum(len(d) for d in docs)
    assert sum(len(b.input_ids) for b in blocks) == total
    assert [t for b in blocks for t in b.input_ids] == [t for d in docs for t in d]
    assert all(len(b.input_ids) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1].input_ids) <= 16
    batch = pretrain.collate(blocks[-2:])
    # Every real token but the first of each block is predicted; padding never is.
    assert pretrain.units(batch) == len(blocks[-2].input_ids) + len(blocks[-1].input_ids) - 2


def test_pad_batch_right_pads_with_ignored_labels():
    batch = pad_batch(_items([3, 5], supervised_from=1), pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, 2, 3, 4, 5]]


# -- bad files: each a DataError / FileNotFoundError naming the file and line, never a raw traceback ---------------

LATIN1 = '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")  # é as the single byte 0xe9
BAD_FILES = [
    ("latin1.jsonl", json.dumps(ALPACA).encode() + b"\n" + LATIN1,
     DataError, r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 21\)"),
    ("latin1.json", b'[\n  {"text": "ok"},\n  ' + LATIN1[:-1] + b"\n]",
     DataError, r"latin1.json:3: not UTF-8 text \(byte 0xe9 at column 23\)"),
    ("latin1.csv", b"instruction,output\nok,fine\ncaf\xe9,x\n", DataError, r"latin1.csv:3: not UTF-8 text"),
    ("extra.csv", b"instruction,output\na,b,c\n", DataError, r"extra.csv:2: 1 more value\(s\) than the header"),
    ("deep.jsonl", b"[" * 100_000 + b"\n", DataError, r"deep.jsonl:1: malformed JSON"),
    ("huge.jsonl", b'{"text": ' + b"9" * 5000 + b"}\n", DataError, r"huge.jsonl:1: malformed JSON"),
    ("bom.jsonl", b"\xef\xbb\xbf" + json.dumps(TEXT).encode() + b"\n", None, None),  # a BOM is fine
]


@pytest.mark.parametrize("name,content,error,message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_bytes_name_the_file_and_line(tmp_path, name, content, error, message):
    path = tmp_path / name
    path.write_bytes(content)
    if error is None:
        assert load_examples(path)[0].text == TEXT["text"]
        return
    with pytest.raises(error, match=message) as e:
        load_examples(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_a_directory_named_like_a_data_file(tmp_path):
    (tmp_path / "x.jsonl").mkdir()
    with pytest.raises(DataError, match=r"x.jsonl is a directory, not a data file"):
        load_examples(tmp_path / "x.jsonl")


def fake_hub_datasets(monkeypatch, error):
    """huggingface_hub's metadata call raising ``error``; datasets itself must never be reached."""
    import datasets
    from huggingface_hub import HfApi

    asked = []

    def repo_info(self, name, repo_type=None, timeout=None):
        asked.append((name, repo_type, timeout))
        raise error

    def load_dataset(*args, **kwargs):
        raise AssertionError("datasets.load_dataset was called for a name the hub does not have")

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def test_a_missing_path_with_one_slash_is_not_a_wait_on_the_network(tmp_path, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    from tuneforge.models.hub import PROBE_TIMEOUT_S

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it; this test asks a fake hub
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    asked = fake_hub_datasets(monkeypatch, RepositoryNotFoundError.__new__(RepositoryNotFoundError))
    with pytest.raises(FileNotFoundError, match=r"^data 'nosuchdir/mydata': no such local file or directory "
                                                r"\(not tried as a hub dataset id: HF_DATASETS_OFFLINE is set\)$"):
        load_examples("nosuchdir/mydata")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    with pytest.raises(FileNotFoundError, match=r"^data 'nosuchdir/mydata': no such local file or directory, and "
                                                r"the hub has no dataset 'nosuchdir/mydata' \(or it is private\)$"):
        load_examples("nosuchdir/mydata:test")
    assert asked == [("nosuchdir/mydata", "dataset", PROBE_TIMEOUT_S)]  # one short request, the split cut off
    with pytest.raises(FileNotFoundError, match="data file not found: nosuchdir/mydata.jsonl"):
        load_examples("nosuchdir/mydata.jsonl")  # a file name, never a hub id
    assert len(asked) == 1
