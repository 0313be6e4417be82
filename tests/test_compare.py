"""``tuneforge compare``: each method in its own process, the table as Markdown / JSON / PNG, and a killed compare
continuing with the methods not yet done."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import qa_rows, write_jsonl
from tuneforge.checkpoint import TRAINING_STATE
from tuneforge.compare import compare, markdown, train_args

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
