"""compare with K seeds on a tiny model: intervals in the table, a seeded rerun that reproduces them exactly, each
method's own learning rate, progress while a run trains, and the equal-token budget."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import qa_rows, write_jsonl
from tuneforge.choose.watch import Watcher, progress_line
from tuneforge.commands.main import main
from tuneforge.choose.compare import compare

pytestmark = pytest.mark.usefixtures("single_thread")


def in_process(args: list[str]) -> tuple[int, str]:
    """`tuneforge train` in this process: the same runs as compare's children, without a torch import each."""
    return main(args), ""


def flags(tmp_path, tiny_model_dir) -> list[str]:
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(12))
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}])
    return ["--model", str(tiny_model_dir), "--data", str(data), "--eval-split", "0.25", "--max-steps", "2",
            "--batch-size", "2", "--max-length", "48", "--eval-generate", "false", "--general-eval", str(general),
            "--seed", "7"]


@pytest.mark.slow  # twelve short trainings: ~100 s on a busy 2-core machine
def test_three_seeds_give_intervals_and_a_seeded_rerun_reproduces_them_exactly(tmp_path, tiny_model_dir):
    shared = flags(tmp_path, tiny_model_dir)
    rows = compare(["lora", "prompt_tuning"], shared, tmp_path / "a", in_process, seeds=3)
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for s in (7, 8, 9) for m in ("lora", "prompt_tuning")]
    assert len({r["gain"] for r in rows if r["method"] == "lora"}) == 3  # the seeds really differ
    first = json.loads((tmp_path / "a" / "compare_summary.json").read_text())
    for method in first["methods"]:
        assert method["seeds"] == [7, 8, 9]
        for key in ("gain", "forgetting", "wall_s", "peak_memory_mb"):
            interval = method["intervals"][key]
            assert interval["n"] == 3 and interval["low"] <= interval["mean"] <= interval["high"], (key, interval)
    assert [m["learning_rate"] for m in first["methods"]] == [2e-4, 3e-2]  # each its own default
    text = (tmp_path / "a" / "compare.md").read_text()
    assert "| lora | 0.0002 (its own default) | 7, 8, 9 | " in text and "**Verdict:** " in text
    # Another folder, the same command: every run trains again and gain and forgetting come out the same.
    compare(["lora", "prompt_tuning"], shared, tmp_path / "b", in_process, seeds=3)
    second = json.loads((tmp_path / "b" / "compare_summary.json").read_text())
    for a, b in zip(first["methods"], second["methods"]):
        for key in ("gain", "forgetting"):
            assert a["values"][key] == b["values"][key] and a["intervals"][key] == b["intervals"][key]
    assert first["verdict"].split(";")[0] == second["verdict"].split(";")[0]


def test_a_config_files_learning_rate_is_its_methods_and_a_flag_is_everyones(tmp_path):
    calls = []

    def runner(args):
        calls.append((args[args.index("--method") + 1], args))
        return 1, "stop"

    config = tmp_path / "mine.yaml"
    config.write_text("method: lora\nlearning_rate: 1.0e-3\n")
    compare(["lora", "prompt_tuning"], [str(config)], tmp_path / "a", runner, seeds=1)
    lr = {m: a[a.index("--learning-rate") + 1] if "--learning-rate" in a else None for m, a in calls}
    assert lr == {"lora": None, "prompt_tuning": "0.03"}  # lora keeps the file's, prompt tuning gets its own
    del calls[:]
    compare(["lora", "prompt_tuning"], [str(config), "--learning-rate", "5e-3"], tmp_path / "b", runner, seeds=1)
    assert all(a[a.index("--learning-rate") + 1] == "5e-3" and a.count("--learning-rate") == 1 for _, a in calls)


def test_progress_lines_come_from_the_runs_metrics(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    watcher = Watcher(metrics, "compare: [1/2] lora, seed 0", total_steps=50)
    assert watcher.report() is None  # nothing written yet
    metrics.write_text(json.dumps({"step": 0, "eval_loss": 2.0}) + "\n")
    assert watcher.report() is None  # the evaluation before training is not a step
    with caplog.at_level(logging.INFO, logger="tuneforge.choose"):
        metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11)))
        assert watcher.report() == "compare: [1/2] lora, seed 0: step 10/50 (20%), loss 0.1000"
        assert watcher.report() is None  # no new step: no new line
    assert "step 10/50 (20%)" in caplog.text
    assert progress_line("x", 20, 50, 0.5, 2.0) == "x: step 20/50 (40%), loss 0.5000, 2 s/step, about 60 s left"


def test_an_equal_token_budget_gives_every_method_the_same_tokens(tmp_path, tiny_model_dir):
    shared = [f for f in flags(tmp_path, tiny_model_dir)]
    i = shared.index("--max-steps")
    del shared[i:i + 2]
    rows = compare(["lora", "prompt_tuning"], shared, tmp_path / "a", in_process, seeds=1, budget_tokens=60)
    seen = {r["method"]: r["tokens_seen"] for r in rows}
    assert seen["lora"] == seen["prompt_tuning"] >= 60
    with pytest.raises(ValueError, match="--budget-tokens sets each run's steps; drop --max-steps"):
        compare(["lora"], [*shared, "--max-steps", "3"], tmp_path / "b", in_process, seeds=1, budget_tokens=60)
