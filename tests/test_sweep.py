"""``tuneforge sweep``: a search space from flags or YAML, checked before anything trains; trials as run folders;
a killed sweep resumes from Optuna's database without rerunning finished trials; pruning stops a diverging trial."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import save_tiny_model_dir, write_jsonl
from tuneforge.errors import ConfigError
from tuneforge.choose.sweep import build_spec, parse_dimension, parse_objective, parse_search_flags

WORDS = "zero one two three four five six seven eight nine".split()


def rows(n: int) -> list[dict]:
    return [{"instruction": f"Count to {i % 10 + 1}.", "output": " ".join(WORDS[: i % 10 + 1])} for i in range(n)]


@pytest.fixture
def setup(tmp_path, tokenizer):
    model = save_tiny_model_dir(tmp_path / "base", "llama", copy.deepcopy(tokenizer))
    write_jsonl(tmp_path / "train.jsonl", rows(12))
    write_jsonl(tmp_path / "eval.jsonl", rows(4))
    return tmp_path, ["--model", str(model), "--data", str(tmp_path / "train.jsonl"), "--eval-data",
                      str(tmp_path / "eval.jsonl"), "--batch-size", "4", "--max-length", "64", "--general-eval",
                      "none", "--eval-generate", "false", "--dtype", "float32", "--device", "cpu"]


def sweep(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "tuneforge", "sweep", *args], capture_output=True, text=True,
                          env=env, **kwargs)


def test_search_specs():
    assert parse_dimension("lora_r", "4,8,16", "--search").choices == [4, 8, 16]
    d = parse_dimension("learning_rate", "log:1e-5..1e-3", "--search")
    assert (d.low, d.high, d.log, d.integer) == (1e-5, 1e-3, True, False)
    assert parse_dimension("lora_r", "int:2..32", "--search").integer
    assert parse_dimension("lora_alpha", [8, 16], "x.yaml").choices == [8, 16]
    assert parse_search_flags(["lora_r=4,8", "seed=0,1"]) == {"lora_r": "4,8", "seed": "0,1"}
    assert parse_objective("eval_loss", None).direction == "minimize"
    assert parse_objective("exact_match", None).direction == "maximize"
    mix = parse_objective("0.7*exact_match - 0.3*forgetting", "maximize")
    assert mix.terms == [(0.7, "exact_match"), (-0.3, "forgetting")]
    assert mix.value({"exact_match_after": 0.5, "forgetting": 0.1}) == pytest.approx(0.32)


@pytest.mark.parametrize("search, options, message", [
    (["lora_rr=4,8"], {}, "unknown option\\(s\\) for method 'lora': rr"),
    (["colour=1,2"], {}, "--search colour: unknown config key 'colour'"),
    (["learning_rate=log:0..1e-3"], {}, "log range needs a low end above 0"),
    (["learning_rate=1e-3..1e-5"], {}, "must be below its high end"),
    (["lora_r=4,-8"], {}, "lora r must be positive"),
    (["lora_r"], {}, "expected KEY=VALUES"),
    (["learning_rate=1e-5..1e-3"], {"sampler": "grid"}, "grid needs lists of values"),
    (["lora_r=4,8"], {"objective": "exact_match + forgetting"}, "needs --direction"),
    (["max_length=32,64"], {"side_by_side": 2}, "max_length=64: max_length differs from adapter max_length=32's"),
    (["lora_r=4,8"], {"side_by_side": 2, "pruner": "none"}, None),
    (["lora_r=4,8"], {"side_by_side": 2, "pruner": "none", "lora_use_dora": True}, "DoRA"),
])
def test_bad_specs_fail_before_anything_trains(search, options, message):
    """Each bad spec fails with the reason; the one good spec (LoRA ranks side by side) builds."""
    base = dict(output=None, trials=None, sampler=None, pruner=None, objective=None, direction=None, seed=None)
    options = dict(options)
    overrides = {"max_steps": 2, **({"lora_use_dora": options.pop("lora_use_dora")} if "lora_use_dora" in options
                                    else {})}
    if message is None:
        assert build_spec(None, overrides, parse_search_flags(search), **{**base, **options}).side_by_side == 2
        return
    with pytest.raises(ConfigError, match=message):
        build_spec(None, overrides, parse_search_flags(search), **{**base, **options})


def test_bad_search_is_one_line_and_exit_2(tmp_path):
    run = sweep(["--search", "learning_rate=log:0..1e-3", "--output", str(tmp_path / "sw")])
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "tuneforge: error: --search: learning_rate: a log range needs a low end above 0, got 0"]
    assert not (tmp_path / "sw").exists()


def trials_of(output) -> list[dict]:
    return json.loads((output / "best.json").read_text())["trials"]


@pytest.mark.slow
def test_grid_sweep_completes_and_prunes_the_diverging_trials(setup):
    tmp_path, common = setup
    out = tmp_path / "sw"
    run = sweep(["--search", "lora_r=2,4", "--search", "learning_rate=1e-2,30", "--sampler", "grid", "--pruner",
                 "median", "--max-steps", "3", "--eval-every", "1", "--output", str(out), *common])
    assert run.returncode == 0, run.stderr
    trials = trials_of(out)
    assert len(trials) == 4
    assert trials[0]["state"] == "complete"
    for t in trials:
        if t["params"]["learning_rate"] == 30:  # diverging: its eval loss trails trial 0's at the same step
            assert t["state"] == "pruned", t
    best = json.loads((out / "best.json").read_text())["best"]
    assert best["params"]["learning_rate"] == 1e-2
    assert f"best trial: {best['trial']} " in run.stdout and best["output"] in run.stdout
    assert json.loads((out / f"trial-{best['trial']:04d}" / "run.json").read_text())["finished"]
    assert (out / f"trial-{best['trial']:04d}" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(setup):
    tmp_path, common = setup
    out = tmp_path / "sw"
    args = ["--search", "learning_rate=log:1e-3..1e-2", "--search", "lora_r=2,4", "--trials", "3", "--pruner", "none",
            "--max-steps", "6", "--output", str(out), *common]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-m", "tuneforge", "sweep", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 600
    while not (out / "trial-0001" / "metrics.jsonl").exists():  # trial 0 finished, trial 1 training
        assert child.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    first_run = json.loads((out / "trial-0000" / "run.json").read_text())
    run = sweep(args)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "trial-0000" / "run.json").read_text())["run_id"] == first_run["run_id"]
    trials = trials_of(out)
    states = [t["state"] for t in trials]
    assert states.count("complete") == 3 and trials[1].get("interrupted") and trials[1]["state"] == "fail"
    assert trials[2]["params"] == trials[1]["params"]  # the interrupted trial's values, run again first
    assert "interrupted, queued again" in run.stdout


@pytest.mark.slow
def test_side_by_side_batches_train_as_lanes_of_one_process(setup):
    tmp_path, common = setup
    out = tmp_path / "sw"
    run = sweep(["--search", "lora_r=2,4", "--sampler", "grid", "--side-by-side", "2", "--max-steps", "2",
                 "--output", str(out), *common])
    assert run.returncode == 0, run.stderr
    assert [t["state"] for t in trials_of(out)] == ["complete", "complete"]
    assert (out / "batch-0000.yaml").is_file() and not (out / "trial-0001.yaml").exists()  # one process for both
    for n, r in ((0, 2), (1, 4)):
        summary = json.loads((out / f"trial-{n:04d}" / "summary.json").read_text())
        assert summary["side_by_side"] == {"adapters": 2, "index": n}
        assert json.loads((out / f"trial-{n:04d}" / "adapter_config.json").read_text())["r"] == r


def test_sweep_help_loads_no_heavy_library():
    from test_cli import heavy_imports

    imported, printed = heavy_imports("sweep", "--help")
    assert imported == [], printed
    assert "--search KEY=VALUES" in printed and "--side-by-side" in printed
