"""``tuneforge compare``: each method in its own process, the table as Markdown / JSON / PNG, and a killed compare
continuing with the methods not yet done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import qa_rows, write_jsonl
from tuneforge.choose.compare import compare, markdown, train_args
from tuneforge.config import ConfigError
from tuneforge.outputs import OutputConflict
from tuneforge.run.checkpoint import TRAINING_STATE
from tuneforge.run.reuse import SettingsChanged

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.slow  # a training child process per method (~5 min on 2 busy cores)
def test_two_methods_two_steps_each_in_its_own_process(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(8))
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge", "compare", "--methods", "lora,prompt_tuning", "--output", str(out),
         "--seeds", "1", "--model", str(tiny_model_dir), "--data", str(data), "--eval-split", "0.25",
         "--max-steps", "2",
         "--batch-size", "2", "--max-length", "64", "--eval-generate", "false", "--general-eval",
         str(write_jsonl(tmp_path / "g.jsonl", [{"text": "The quick brown fox."}]))],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "prompt_tuning"]
    for row in rows:
        for key in ("trainable_params", "peak_memory_mb", "wall_s", "tokens_per_s", "eval_loss", "gain",
                    "general_ppl_before", "general_ppl_after", "forgetting", "learning_rate", "tokens_seen", "step_s"):
            assert key in row, (row["method"], key)
    assert rows[0]["trainable_params"] != rows[1]["trainable_params"]
    # No learning rate given: each method trains with its own default, and the table says so.
    assert [r["learning_rate"] for r in rows] == [2e-4, 3e-2] and rows[0]["tokens_seen"] == rows[1]["tokens_seen"]
    assert "| prompt_tuning | 0.03 (its own default) | 0 |" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lora |" in (out / "compare.md").read_text()
    # Each method's wait is visible as it happens: compare numbers them and relays each run's stage lines.
    assert "compare: [1/2] lora, seed 0: training" in proc.stderr
    assert "compare: [2/2] prompt_tuning, seed 0: training" in proc.stderr
    assert proc.stderr.count("general-text perplexity: 1 example(s) in") == 4  # before and after, per method


@pytest.mark.slow  # compare killed and resumed: training children (~30 s)
def test_a_killed_compare_skips_finished_methods_and_resumes_the_rest(tmp_path):
    """The runner is faked: what matters is which methods are trained again and with which flags."""
    calls = []

    def runner(args):
        method, run_dir = args[args.index("--method") + 1], Path(args[args.index("--output") + 1])
        calls.append((method, args[-1]))
        if method == "adapter" and len(calls) == 2:
            (run_dir / "checkpoints" / "step-1").mkdir(parents=True)  # killed after its first checkpoint
            (run_dir / "checkpoints" / "step-1" / TRAINING_STATE).write_text("{}")
            return 1, "Traceback ...\nKeyboardInterrupt"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps({"run_id": "x", "finished": True}))
        (run_dir / "summary.json").write_text(json.dumps({"trainable_params": 10, "total_params": 100,
                                                          "eval_before_loss": 2.0, "eval_loss": 1.5}))
        return 0, ""

    first = compare(["lora", "adapter"], ["--max-steps", "2"], tmp_path, runner, seeds=1)
    assert first[1] == {"method": "adapter", "seed": 0, "error": "KeyboardInterrupt"}
    second = compare(["lora", "adapter"], ["--max-steps", "2"], tmp_path, runner, seeds=1)
    assert calls == [("lora", "--overwrite"), ("adapter", "--overwrite"), ("adapter", "--resume")]
    assert [r["gain"] for r in second] == [0.5, 0.5]
    assert "| adapter | 0 | 0.0003 | 10 |" in markdown(second)


def test_unknown_method_fails_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        compare(["lora", "no_such_method"], [], tmp_path, lambda args: pytest.fail("ran"))
    with pytest.raises(ValueError, match="--seeds must be a positive integer, got 0"):
        compare(["lora"], [], tmp_path, lambda args: pytest.fail("ran"), seeds=0)


def test_flags_pass_through_and_method_and_output_win(tmp_path):
    args = train_args("lora", tmp_path / "runs" / "lora", ["--data", "a.jsonl", "--method", "full"])
    assert args[:3] == ["train", "--data", "a.jsonl"] and args[args.index("--output") + 1].endswith("lora")
    assert args.index("--method", 4) > args.index("full")
    assert args[-1] == "--overwrite" and train_args("lora", tmp_path, [], resume=True)[-1] == "--resume"


def finishing_runner(output, calls):
    """A fake ``tuneforge train``: records (method, its flags) and leaves a finished run with a summary."""
    def runner(args):
        method = args[args.index("--method") + 1]
        calls.append((method, args))
        run_dir = Path(args[args.index("--output") + 1])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps({"run_id": "x", "finished": True}))
        (run_dir / "summary.json").write_text(json.dumps({"eval_before_loss": 2.0, "eval_loss": 1.5}))
        return 0, ""
    return runner


def test_a_rerun_with_other_settings_or_data_is_refused_naming_what_changed(tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(4))
    out, calls = tmp_path / "cmp", []
    runner = finishing_runner(out, calls)
    flags = ["--data", str(data), "--max-steps", "2"]
    compare(["lora", "adapter"], flags, out, runner, seeds=1)
    assert compare(["lora", "adapter"], flags, out, runner, seeds=1)[0]["gain"] == 0.5 and len(calls) == 2  # reused
    with pytest.raises(SettingsChanged, match="compare: lora, adapter: max_steps 2 -> 3; pass --overwrite"):
        compare(["lora", "adapter"], [*flags, "--max-steps", "3"], out, runner, seeds=1)
    with pytest.raises(SettingsChanged, match="learning_rate null -> 0.001"):
        compare(["lora", "adapter"], [*flags, "--learning-rate", "1e-3"], out, runner, seeds=1)
    write_jsonl(data, qa_rows(5))
    with pytest.raises(SettingsChanged, match=r"compare: lora, adapter: data changed \(.*sft.jsonl\)"):
        compare(["lora", "adapter"], flags, out, runner, seeds=1)
    assert len(calls) == 2
    from tuneforge.commands.main import main  # the command: one line, exit 2, nothing trained

    assert main(["compare", "--methods", "lora,adapter", "--seeds", "1", "--output", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("tuneforge: error: compare: lora, adapter: "
                                                                       "data changed")
    flags = ["--data", str(data), "--max-steps", "3"]
    compare(["lora", "adapter"], flags, out, runner, overwrite=True, seeds=1)
    assert [(m, a[-1], a[a.index("--max-steps") + 1]) for m, a in calls[2:]] == [
        ("lora", "--overwrite", "3"), ("adapter", "--overwrite", "3")]
    del calls[:]
    compare(["lora", "adapter"], [*flags, "--lora-r", "4"], out, runner, overwrite=True, seeds=1)
    assert [m for m, _ in calls] == ["lora"]  # only the changed row trains again
    compare(["lora", "adapter"], [*flags, "--lora-r", "4"], out, runner, overwrite=True, seeds=1)
    assert [m for m, _ in calls] == ["lora", "lora", "adapter"]  # nothing changed: the user asked for every row
    assert len(compare(["lora", "adapter"], [*flags, "--lora-r", "4"], out, runner, seeds=1)) == 2 and len(calls) == 3


def test_a_method_option_reaches_that_method_only(tmp_path):
    calls = []
    compare(["lora", "prompt_tuning"], ["--lora-r", "4", "--prompt-num-virtual-tokens", "3",
                                        "--max-steps", "1"], tmp_path, finishing_runner(tmp_path, calls), seeds=1)
    own = {m: args for m, args in calls}
    assert "--lora-r" in own["lora"] and "--prompt-num-virtual-tokens" not in own["lora"]
    assert "--prompt-num-virtual-tokens" in own["prompt_tuning"] and "--lora-r" not in own["prompt_tuning"]
    never = lambda args: pytest.fail("trained")  # noqa: E731
    with pytest.raises(ValueError, match=r"--lora-r is an option of lora, which --methods does not name \(adapter, "
                       r"prompt_tuning\)$"):
        compare(["adapter", "prompt_tuning"], ["--lora-r", "4"], tmp_path / "a", never)
    with pytest.raises(ValueError, match=r"\(adapter, qlora\); for those methods give --qlora-r$"):
        compare(["adapter", "qlora"], ["--lora-r", "4"], tmp_path / "a", never)
    with pytest.raises(ValueError, match="--method-options would reach every method"):
        compare(["lora", "adapter"], ["--method-options", "{r: 4}"], tmp_path / "b", never)
    with pytest.raises(ConfigError, match="adapter"):  # a bad option of the last method: before the first trains
        compare(["lora", "adapter"], ["--adapter-no-such-option", "1"], tmp_path / "c", never)


def test_the_output_is_never_an_input_nor_someone_elses_folder(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(4))
    never = lambda args: pytest.fail("trained")  # noqa: E731
    with pytest.raises(OutputConflict, match="contains the input"):
        compare(["lora"], ["--data", str(data)], tmp_path, never)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict, match="not empty; pass --overwrite"):
        compare(["lora"], ["--data", str(data)], other, never)
    calls = []
    compare(["lora"], ["--data", str(data), "--overwrite"], other, finishing_runner(other, calls), seeds=1)
    assert [m for m, _ in calls] == ["lora"] and (other / "compare.json").is_file()


def children_of(pid: int) -> list[int]:
    """The `tuneforge train` processes ``pid`` started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[1]) == pid and b"train" in (stat.parent / "cmdline").read_bytes().split(b"\0"):
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for whoever adopted it to reap it has stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_compare_stops_its_training_child(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(8))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "compare", "--methods", "lora", "--output", str(tmp_path / "cmp"),
         "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "100000", "--batch-size", "2",
         "--max-length", "64", "--eval-generate", "false", "--general-eval", "none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.monotonic() + 120
        while child is None and proc.poll() is None and time.monotonic() < deadline:
            child = next(iter(children_of(proc.pid)), None)
            time.sleep(0.1)
        assert child is not None, "compare started no training child"
        proc.kill()  # SIGKILL: compare gets no chance to clean up
        proc.wait()
        # The child is still importing torch (seconds): left alone it would live on (and train, once it stops
        # writing to the closed pipe); the parent-death signal ends it at once.
        deadline = time.monotonic() + 3
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the training child outlived compare"
    finally:
        proc.kill()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
