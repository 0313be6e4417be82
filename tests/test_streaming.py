"""--streaming: training data read with datasets' IterableDataset, tokenized a chunk at a time, resumed exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tuneforge
from conftest import qa_rows, write_jsonl
from test_reliability import adapter, assert_same_weights, cli, config, killed_before_step, train
from tuneforge.commands.main import main
from tuneforge.data import streaming
from tuneforge.data.formats import DataError, load_examples
from tuneforge.data.mixing import parse_sources
from tuneforge.data.streaming import RecordStream, StreamSampler

pytestmark = pytest.mark.usefixtures("single_thread")


def sampler(paths, buffer=8, chunk=7, seed=0) -> StreamSampler:
    """Records straight from the stream (no tokenizer): an item is the record's Example."""
    stream = RecordStream(parse_sources([str(p) for p in paths]), "auto", seed, buffer)
    return StreamSampler(stream, lambda examples: (examples, None), chunk)


def sources(examples) -> list[str]:
    return [e.source for e in examples]


def line(source: str) -> int:
    return int(source.rsplit(":", 1)[1].split()[-1])


def streamed(tmp_path, data, name="stream", **overrides):
    return config(tmp_path, data, name, streaming=True, **overrides)


def test_every_record_is_read_once_per_epoch_in_a_seeded_buffer_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(50))
    s = sampler([path])
    first, second = sources(s.take(50)), sources(s.take(50))
    everything = sorted(f"{path}:{i}" for i in range(1, 51))  # a JSONL record is named by its line
    assert sorted(first) == everything and sorted(second) == everything  # each record once per epoch
    assert first != sorted(first, key=line)  # shuffled
    assert first != second  # reshuffled for the next epoch (set_epoch)
    assert s.epoch == 1 and sum(s.stream.read) == 100
    assert sources(sampler([path]).take(100)) == first + second  # the seed alone decides the order
    assert sources(sampler([path], seed=1).take(50)) != first


def test_a_resume_mid_chunk_and_across_an_epoch_continues_the_same_sequence(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(30))
    want = sources(sampler([path]).take(80))
    for cut in (1, 7, 23, 30, 44):  # inside a chunk, on a chunk boundary, at the epoch's end, in the next epoch
        interrupted = sampler([path])
        interrupted.take(cut)
        state = json.loads(json.dumps(interrupted.state()))  # as a checkpoint's progress.json holds it
        resumed = sampler([path])
        resumed.restore(state)
        assert sources(resumed.take(80 - cut)) == want[cut:], cut
        assert resumed.stream.read == sampler_reads(path, 80)


def sampler_reads(path, k: int) -> list[int]:
    s = sampler([path])
    s.take(k)
    return s.stream.read


def test_datasets_own_state_dict_is_not_exact_after_a_shuffle_so_the_position_is_a_record_count(tmp_path):
    """Why the stream stores (epoch, records read) and skips: datasets' state_dict() drops the shuffle buffer."""
    import datasets

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(100)])

    def shuffled():
        ds = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
        return ds.shuffle(seed=3, buffer_size=10)

    ds = shuffled()
    rows = iter(ds)
    for _ in range(37):
        next(rows)
    state, rest = ds.state_dict(), [r["text"] for r in rows]
    again = shuffled()
    again.load_state_dict(state)
    assert [r["text"] for r in again] != rest


def test_only_a_buffer_and_a_chunk_of_a_large_file_are_read_before_the_first_step(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", qa_rows(5000))
    s = sampler([path], buffer=16, chunk=8)
    batch = s.take(4)
    assert len(batch) == 4 and s.stream.index == 8 and sum(s.stream.read) == 8  # one chunk normalised
    # A buffer shuffle draws from the first 16 records read, then each next one: record numbers stay small.
    assert max(line(src) for src in sources(s.items)) <= 16 + 8


def test_a_bad_record_names_the_file_and_line_as_the_in_memory_reader_does(tmp_path):
    missing = tmp_path / "missing.jsonl"
    rows = qa_rows(6)
    del rows[3]["output"]
    missing.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 1 else "") for i, r in enumerate(rows)))
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(qa_rows(1)[0]) + "\n" + '{"instruction": "x", "output": \n')
    extra_cell = tmp_path / "extra.csv"  # pandas refuses the row; the in-memory reader names its line
    extra_cell.write_text("instruction,output\nSay 1.,one\nSay 2.,two,2\n")
    bad_label = tmp_path / "label.csv"  # normalise refuses record 2; read again in memory, it is named by line 3
    bad_label.write_text("prompt,completion,label\nHi,Hello,true\nHi,Go away,maybe\n")
    cases = ((missing, 5), (malformed, 2), (extra_cell, 3), (bad_label, 3))
    for path, line in cases:  # missing.jsonl: a blank line before the bad record, so line 5 is record 4
        with pytest.raises(DataError) as in_memory:
            load_examples(path)
        with pytest.raises(DataError) as streamed_error:
            sampler([path], buffer=1).take(6)
        assert str(streamed_error.value) == str(in_memory.value)
        assert str(streamed_error.value).startswith(f"{path}:{line}: ")


def test_records_read_as_the_in_memory_reader_reads_them(tmp_path):
    """Values keep their types (arrow's JSON reader would turn "2033-08-31" into a datetime); CSV cells stay
    strings; a key a record lacks stays absent."""
    rows = [{"instruction": "Write the date.", "input": "31 August 2033", "output": "2033-08-31"},
            {"instruction": "Count.", "output": "12", "system": "Answer briefly."}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("instruction,input,output\nWrite the date.,,2033-08-31\nCount.,3 4,12\n")
    for path in (jsonl, csv_file):
        want = load_examples(path)
        got = sampler([path], buffer=1).take(2)
        assert [(e.messages, e.fields) for e in got] == [(e.messages, e.fields) for e in want]
    assert sources(got) == [f"{csv_file}:record 1", f"{csv_file}:record 2"]  # CSV: by record (a cell may span lines)


def test_weighted_sources_interleave_and_each_is_counted(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(40))
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Hi", "output": "hello"}] * 4)
    stream = RecordStream(parse_sources([f"{a}:0.75", f"{b}:0.25"]), "auto", 0, 8)
    s = StreamSampler(stream, lambda examples: (examples, None), 7)
    taken = sources(s.take(40))
    from_a = [x for x in taken if x.startswith(str(a))]
    assert 24 <= len(from_a) <= 36  # ~0.75 of the draws
    assert len(set(taken) - set(from_a)) == 4  # the small source is read whole (and repeats: replay)
    summary = stream.summary()
    assert [row["records_read"] for row in summary] == stream.read and sum(stream.read) >= 40
    assert [row["weight"] for row in summary] == [0.75, 0.25]


def test_streaming_in_file_order_gives_the_in_memory_runs_weights(tmp_path, tokenizer):
    """With the same order (buffer 1 = file order; the in-memory file laid out in its sampler's permutation), a
    streaming run trains on the same batches and reaches the same weights."""
    rows = qa_rows(16)
    order = np.random.default_rng([0, 0]).permutation(16)  # EpochSampler's epoch-0 order for seed 0
    laid_out = [None] * 16
    for j, i in enumerate(order):
        laid_out[i] = rows[j]
    in_memory = train(config(tmp_path, write_jsonl(tmp_path / "m.jsonl", laid_out), "memory"), tokenizer)
    stream = train(streamed(tmp_path, write_jsonl(tmp_path / "s.jsonl", rows), shuffle_buffer=1), tokenizer)
    assert_same_weights(adapter(stream.output), adapter(in_memory.output))
    assert stream.metrics["records"] == 16 and stream.metrics["epoch"] == 0


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_streaming_run_resumes_to_the_uninterrupted_weights_and_losses(tmp_path, tokenizer, sft_file,
                                                                              monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_RECORDS", 5)  # chunks end mid-batch: the position is inside one
    settings = dict(max_steps=7, save_every=1, shuffle_buffer=4)  # 16 records, batches of 4: epoch 2 at step 5
    whole = train(streamed(tmp_path, sft_file, "whole", **settings), tokenizer)
    for kill in (2, 5):
        cfg = streamed(tmp_path, sft_file, f"killed{kill}", **settings)
        killed_before_step(kill, cfg, tokenizer)
        resumed = train(cfg.model_copy(update={"resume": True}), tokenizer)
        assert_same_weights(adapter(resumed.output), adapter(whole.output))
        assert losses(resumed.output) == losses(whole.output)
        assert resumed.metrics["epoch"] == whole.metrics["epoch"] == 1


def test_too_long_records_are_counted_as_the_stream_goes(tmp_path, tokenizer):
    rows = qa_rows(16)
    for i in (2, 9, 13):
        rows[i]["output"] = "word " * 80
    result = train(streamed(tmp_path, write_jsonl(tmp_path / "long.jsonl", rows), max_steps=3, shuffle_buffer=1),
                   tokenizer)
    assert result.metrics["dropped"] == 3 and result.metrics["records"] == 16


@pytest.mark.parametrize("flags, message", [
    ([], "streaming: the data's length is not known until it has been read; set max_steps"),
    (["--max-steps", "2", "--eval-split", "0.1"], "streaming: eval_split would have to read the whole file"),
])
def test_streaming_needs_max_steps_and_eval_data(tmp_path, sft_file, capsys, flags, message):
    code, error = cli(capsys, "train", "--data", sft_file, "--streaming", "--output", tmp_path / "run", *flags)
    assert code == 2 and message in error


def test_streaming_under_torchrun_is_refused(tmp_path, sft_file, monkeypatch):
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    with pytest.raises(tuneforge.errors.TuneforgeError, match="--streaming runs in one process"):
        tuneforge.run.trainer.training_data(streamed(tmp_path, sft_file))


def test_a_two_source_streaming_run_prints_and_logs_what_each_source_gave(tmp_path, tiny_model_dir, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(12))
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(4))
    code = main(["train", "--model", str(tiny_model_dir), "--data", f"{a}:0.5", "--data", f"{b}:0.5", "--streaming",
                 "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--max-length", "64",
                 "--progress", "false", "--eval-generate", "false", "--general-eval", "none"])
    out, err = capsys.readouterr()
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sources = [r["data_sources"] for r in records if "data_sources" in r]
    assert len(sources) == 1 and [s["source"] for s in sources[0]] == [str(a), str(b)]
    for source in sources[0]:
        assert f"data source {source['source']}: {source['records_read']} records read " in out
    assert sum(s["records_read"] for s in sources[0]) >= 8  # two steps of four
    assert f"report: {tmp_path / 'run' / 'report'}" in out
