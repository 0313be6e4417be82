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
from tuneforge.run.checkpoint import TRAINING_STATE
from tuneforge.choose.compare import compare, draw_chart, markdown, train_args
from tuneforge.config import ConfigError
from tuneforge.outputs import OutputConflict
from tuneforge.run.reuse import SettingsChanged

pytestmark = pytest.mark.usefixtures("single_thread")


def test_two_methods_two_steps_each_in_its_own_process(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(8))
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge", "compare", "--methods", "lora,prompt_tuning", "--output", str(out),
         "--model", str(tiny_model_dir), "--data", str(data), "--eval-split", "0.25", "--max-steps", "2",
         "--batch-size", "2", "--max-length", "64", "--eval-generate", "false", "--general-eval",
         str(write_jsonl(tmp_path / "g.jsonl", [{"text": "The quick brown fox."}]))],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "prompt_tuning"]
    for row in rows:
        for key in ("trainable_params", "peak_memory_mb", "wall_s", "tokens_per_s", "eval_loss", "gain",
                    "general_ppl_before", "general_ppl_after", "forgetting"):
            assert key in row, (row["method"], key)
    assert rows[0]["trainable_params"] != rows[1]["trainable_params"]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lora |" in (out / "compare.md").read_text()
    # Each method's wait is visible as it happens: compare numbers them and relays each run's stage lines.
    assert "compare: [1/2] training lora" in proc.stderr and "compare: [2/2] training prompt_tuning" in proc.stderr
    assert proc.stderr.count("general-text perplexity: 1 example(s) in") == 4  # before and after, per method


def test_a_killed_compare_skips_finished_methods_and_resumes_the_rest(tmp_path):
    """The runner is faked: what matters is which methods are trained again and with which flags."""
    calls = []

    def runner(args):
        method, run_dir = args[args.index("--method") + 1], tmp_path / "runs" / args[args.index("--method") + 1]
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

    first = compare(["lora", "adapter"], ["--max-steps", "2"], tmp_path, runner)
    assert first[1] == {"method": "adapter", "error": "KeyboardInterrupt"}
    second = compare(["lora", "adapter"], ["--max-steps", "2"], tmp_path, runner)
    assert calls == [("lora", "--overwrite"), ("adapter", "--overwrite"), ("adapter", "--resume")]
    assert [r["gain"] for r in second] == [0.5, 0.5]
    assert "| adapter | 10 |" in markdown(second)


def test_unknown_method_fails_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        compare(["lora", "no_such_method"], [], tmp_path, lambda args: pytest.fail("ran"))


def test_flags_pass_through_and_method_and_output_win(tmp_path):
    args = train_args("lora", tmp_path / "runs" / "lora", ["--data", "a.jsonl", "--method", "full"])
    assert args[:3] == ["train", "--data", "a.jsonl"] and args[args.index("--output") + 1].endswith("lora")
    assert args.index("--method", 4) > args.index("full")
    assert args[-1] == "--overwrite" and train_args("lora", tmp_path, [], resume=True)[-1] == "--resume"


def test_chart_names_methods_in_one_legend_whose_labels_do_not_overlap():
    """LoRA and DoRA use about the same memory for about the same gain: names written beside the points overlapped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [{"method": "lora", "trainable_params": 4_000, "peak_memory_mb": 812.0, "wall_s": 30.0, "gain": 0.4010},
            {"method": "dora", "trainable_params": 4_200, "peak_memory_mb": 815.0, "wall_s": 33.0, "gain": 0.4020},
            {"method": "prompt_tuning", "trainable_params": 900, "peak_memory_mb": 790.0, "wall_s": 25.0,
             "gain": 0.1},
            {"method": "full", "error": "out of memory"}]  # no gain: not drawn
    fig = draw_chart(rows)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for legend in fig.legends for t in legend.get_texts()]
    for ax in fig.axes:  # the tick labels drawn: a tick outside the axis's range has a label that is not
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        texts += [*ax.texts, *(t for t in ax.xaxis.get_ticklabels(which="both") if x0 <= t.get_position()[0] <= x1),
                  *(t for t in ax.yaxis.get_ticklabels(which="both") if y0 <= t.get_position()[1] <= y1)]
    texts = [t for t in texts if t.get_visible() and t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not [t.get_text() for t in texts if "10^" in t.get_text()]  # "2k", not "2×10³"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lora", "dora", "prompt_tuning"]
    # Each method keeps its colour in every panel, so the one legend names the points of all three.
    colours = {}
    for ax in fig.axes:
        for collection in ax.collections:
            colours.setdefault(collection.get_label(), set()).add(tuple(collection.get_facecolor()[0]))
    assert set(colours) == {"lora", "dora", "prompt_tuning"} and all(len(c) == 1 for c in colours.values())
    assert len({c.pop() for c in colours.values()}) == 3
    assert "process max RSS" in fig.axes[1].get_xlabel()
    assert draw_chart([{"method": "full", "error": "failed"}]) is None


def finishing_runner(output, calls):
    """A fake ``tuneforge train``: records (method, its flags) and leaves a finished run with a summary."""
    def runner(args):
        method = args[args.index("--method") + 1]
        calls.append((method, args))
        run_dir = output / "runs" / method
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
    compare(["lora", "adapter"], flags, out, runner)
    assert compare(["lora", "adapter"], flags, out, runner)[0]["gain"] == 0.5 and len(calls) == 2  # reused
    with pytest.raises(SettingsChanged, match="compare: lora, adapter: max_steps 2 -> 3; pass --overwrite"):
        compare(["lora", "adapter"], [*flags, "--max-steps", "3"], out, runner)
    with pytest.raises(SettingsChanged, match="learning_rate null -> 0.001"):
        compare(["lora", "adapter"], [*flags, "--learning-rate", "1e-3"], out, runner)
    write_jsonl(data, qa_rows(5))
    with pytest.raises(SettingsChanged, match=r"compare: lora, adapter: data changed \(.*sft.jsonl\)"):
        compare(["lora", "adapter"], flags, out, runner)
    assert len(calls) == 2
    from tuneforge.commands.main import main  # the command: one line, exit 2, nothing trained

    assert main(["compare", "--methods", "lora,adapter", "--output", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("tuneforge: error: compare: lora, adapter: "
                                                                       "data changed")
    flags = ["--data", str(data), "--max-steps", "3"]
    compare(["lora", "adapter"], flags, out, runner, overwrite=True)
    assert [(m, a[-1], a[a.index("--max-steps") + 1]) for m, a in calls[2:]] == [
        ("lora", "--overwrite", "3"), ("adapter", "--overwrite", "3")]
    del calls[:]
    compare(["lora", "adapter"], [*flags, "--lora-r", "4"], out, runner, overwrite=True)
    assert [m for m, _ in calls] == ["lora"]  # only the changed row trains again
    compare(["lora", "adapter"], [*flags, "--lora-r", "4"], out, runner, overwrite=True)
    assert [m for m, _ in calls] == ["lora", "lora", "adapter"]  # nothing changed: the user asked for every row
    assert len(compare(["lora", "adapter"], [*flags, "--lora-r", "4"], out, runner)) == 2 and len(calls) == 3


def test_a_method_option_reaches_that_method_only(tmp_path):
    calls = []
    compare(["lora", "prompt_tuning"], ["--lora-r", "4", "--prompt-num-virtual-tokens", "3",
                                        "--max-steps", "1"], tmp_path, finishing_runner(tmp_path, calls))
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
    compare(["lora"], ["--data", str(data), "--overwrite"], other, finishing_runner(other, calls))
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
