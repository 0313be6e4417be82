"""Reliability: nothing lost, no wrong weights, no tracebacks (issue 11's sweep, each case a test).

The fault-injection test at the end kills training processes at random points, inside checkpoint and final writes
included, the way ``kill -9`` does (``os._exit`` in a forked child: no cleanup runs), and checks that resuming
reaches the uninterrupted run's weights every time."""

from __future__ import annotations

import copy
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import tuneforge
from conftest import make_tiny_model, qa_rows, write_jsonl
from tuneforge.run import checkpoint as ckpt
from tuneforge.commands.main import main
from tuneforge.errors import ResumeMismatch, RunInUse, TrainingDiverged

pytestmark = pytest.mark.usefixtures("single_thread")


def config(tmp_path, data, name="run", **overrides):
    values = dict(data=str(data), output=str(tmp_path / name), max_steps=4, batch_size=4, learning_rate=1e-2,
                  max_length=64, progress=False, seed=0, warmup_steps=0, eval_generate=False,
                  method_options={"r": 4, "lora_dropout": 0.2})
    values.update(overrides)
    return tuneforge.load_config(None, values)


def train(cfg, tokenizer):
    return tuneforge.train(cfg, make_tiny_model("llama", len(tokenizer)), copy.deepcopy(tokenizer))


def killed_before_step(step: int, cfg, tokenizer) -> None:
    """Train ``cfg`` and interrupt it as 0-based ``step`` begins (what a kill leaves: checkpoints, no result)."""
    original = tuneforge.run.trainer.Trainer.optimizer_step

    def killed(self, batches, i):
        if i == step:
            raise KeyboardInterrupt
        return original(self, batches, i)

    tuneforge.run.trainer.Trainer.optimizer_step = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tokenizer)
    finally:
        tuneforge.run.trainer.Trainer.optimizer_step = original


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7)


def cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and the error line (exactly one line says ``tuneforge: error:``; progress bars may precede it)."""
    code = main([str(a) for a in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tuneforge: error:")]
    assert len(errors) == (code == 2), errors
    return code, errors[0] if errors else ""


# -- 1. --overwrite owns the directory: the old run's checkpoints can neither be pruned into nor resumed ----------


def test_overwrite_clears_the_old_runs_checkpoints_and_a_resume_reaches_the_new_runs_weights(tmp_path, tokenizer,
                                                                                              sft_file):
    old = train(config(tmp_path, sft_file, max_steps=8, save_every=2, learning_rate=3e-2, seed=5), tokenizer)
    assert [p.name for p in ckpt.checkpoints_newest_first(old.output)] == ["step-6", "step-4"]
    reference = train(config(tmp_path, sft_file, "reference", max_steps=4, save_every=1), tokenizer)

    # The new run into the same folder is killed after its step 2 (the old run's step-6 is still newest by number).
    killed_before_step(2, config(tmp_path, sft_file, max_steps=4, save_every=1, overwrite=True), tokenizer)
    assert [p.name for p in ckpt.checkpoints_newest_first(old.output)] == ["step-2", "step-1"]
    train(config(tmp_path, sft_file, max_steps=4, save_every=1, resume=True), tokenizer)
    assert_same_weights(adapter(old.output), adapter(reference.output))


def test_resume_with_different_settings_is_refused(tmp_path, tokenizer, sft_file, capsys):
    killed_before_step(3, config(tmp_path, sft_file, save_every=1), tokenizer)
    with pytest.raises(ResumeMismatch, match=r"different settings \(method_options\)"):
        train(config(tmp_path, sft_file, save_every=1, resume=True, method_options={"r": 2}), tokenizer)
    with pytest.raises(ResumeMismatch, match="learning_rate"):
        train(config(tmp_path, sft_file, save_every=1, resume=True, learning_rate=1e-3), tokenizer)
    # Without --resume or --overwrite the unfinished run's checkpoints are not silently thrown away.
    with pytest.raises(FileExistsError, match="unfinished run with a checkpoint"):
        train(config(tmp_path, sft_file, save_every=1), tokenizer)


# -- 2. a checkpoint never holds non-finite tensors; NaN stops are one-line errors --------------------------------


def test_a_diverging_run_never_writes_a_nan_checkpoint(tmp_path, tokenizer, sft_file):
    cfg = config(tmp_path, sft_file, max_steps=6, save_every=1, learning_rate=1e6, max_grad_norm=None)
    with pytest.raises(TrainingDiverged, match="NaN or infinite|loss is nan|gradient norm"):
        train(cfg, tokenizer)
    for path in ckpt.checkpoints_newest_first(tmp_path / "run"):
        trainable, _ = ckpt.load_training_state(path)
        assert all(torch.isfinite(t).all() for t in trainable.values()), path
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


# -- 3. bad settings are refused before anything loads --------------------------------------------------------

BAD_SETTINGS = [
    (["--max-grad-norm", "-1"], "max_grad_norm: Input should be greater than 0"),
    (["--max-steps", "0"], "max_steps: Input should be greater than or equal to 1"),
    (["--max-steps", "-3"], "max_steps: Input should be greater than or equal to 1"),
    (["--epochs", "0"], "epochs: Input should be greater than 0"),
    (["--keep-checkpoints", "0"], "keep_checkpoints: Input should be greater than or equal to 1"),
    (["--keep-checkpoints", "-1"], "keep_checkpoints: Input should be greater than or equal to 1"),
    (["--eval-split", "1.5"], "eval_split: Input should be less than 1"),
    (["--batch-size", "0"], "batch_size: Input should be greater than or equal to 1"),
    (["--batch-size", "8", "--micro-batch-size", "3"], "batch_size 8 is not a multiple of micro_batch_size 3"),
    (["--lora-r", "many"], "r: Input should be a valid integer"),
    (["--sft-train-on-promt", "true"], "unknown option(s) for objective 'sft': train_on_promt"),
]


@pytest.mark.parametrize("flags, message", BAD_SETTINGS)
def test_bad_settings_exit_2_before_the_model_loads(tmp_path, sft_file, capsys, flags, message):
    code, err = cli(capsys, "train", "--model", tmp_path / "never-loaded", "--data", sft_file,
                    "--output", tmp_path / "run", *flags)
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_rank_no_layer_can_hold_is_refused_before_allocating(tmp_path, tiny_model_dir, sft_file, capsys):
    code, err = cli(capsys, "train", "--model", tiny_model_dir, "--data", sft_file, "--output", tmp_path / "run",
                    "--lora-r", "1e9", "--progress", "false")
    assert code == 2 and "r=1000000000 exceeds the smaller dimension of every target layer" in err


# -- 4. one run per output directory --------------------------------------------------------------------------


def test_a_second_run_into_a_busy_directory_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, tokenizer,
                                                                                         sft_file):
    with ckpt.OutputLock(tmp_path / "run"):
        with pytest.raises(RunInUse, match=f"in use by a running training run \\(pid {os.getpid()}\\)"):
            train(config(tmp_path, sft_file), tokenizer)
    pid = os.fork()
    if pid == 0:  # a run that holds the lock and is killed
        ckpt.OutputLock(tmp_path / "run").__enter__()
        os._exit(137)
    os.waitpid(pid, 0)
    assert train(config(tmp_path, sft_file), tokenizer).steps == 4


# -- 5 / 9. damaged or poisoned adapters are one-line errors, never loaded -----------------------------------------


@pytest.fixture
def saved_adapter(tmp_path, tiny_model_dir):
    model, _ = tuneforge.load_model(str(tiny_model_dir), device="cpu")
    handle = tuneforge.attach(model, tuneforge.LoRAConfig(r=2, init_lora_weights=False))
    return handle.save(tmp_path / "adapter", base_model_name_or_path=str(tiny_model_dir))


def damage(kind: str, adapter_dir) -> None:
    weights, config_file = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json"
    if kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif kind == "empty weights":
        weights.write_bytes(b"")
    elif kind == "config not JSON":
        config_file.write_text("{not json")
    elif kind == "config is a list":
        config_file.write_text("[1, 2]")
    elif kind == "NaN weights":
        tensors = load_file(str(weights))
        first = sorted(tensors)[0]
        tensors[first][0, 0] = float("nan")
        save_file(tensors, str(weights))


@pytest.mark.parametrize("kind, message", [
    ("truncated weights", "not a readable safetensors file"),
    ("empty weights", "not a readable safetensors file"),
    ("config not JSON", "adapter_config.json: not valid JSON"),
    ("config is a list", "adapter_config.json: expected a JSON object, found list"),
    ("NaN weights", "1 tensor(s) hold NaN or infinite values"),
])
def test_damaged_adapters_are_refused(tmp_path, saved_adapter, capsys, kind, message):
    damage(kind, saved_adapter)
    for command in (["generate", "--adapter", saved_adapter, "--prompt", "hi", "--max-new-tokens", "2"],
                    ["merge", saved_adapter, "--output", tmp_path / "merged"]):
        code, err = cli(capsys, *command)
        assert code == 2 and message in err, err
    assert not (tmp_path / "merged").exists()


# -- 8. crash leftovers --------------------------------------------------------------------------------------------


def test_leftovers_are_cleaned_and_a_corrupt_newest_checkpoint_falls_back(tmp_path, tokenizer, sft_file):
    reference = train(config(tmp_path, sft_file, "reference", save_every=1), tokenizer)
    killed_before_step(3, config(tmp_path, sft_file, save_every=1), tokenizer)
    run = tmp_path / "run"
    newest = ckpt.latest_checkpoint(run)
    assert newest.name == "step-3"
    (newest / "trainable.safetensors").write_bytes(b"\0" * 10)  # damaged after it was written
    leftovers = [run / ".final.tmp999", run / "checkpoints" / ".step-9.tmp999"]
    for path in leftovers:
        path.mkdir()
        (path / "big.bin").write_bytes(b"x" * 1000)
    train(config(tmp_path, sft_file, save_every=1, resume=True), tokenizer)
    assert not any(p.exists() for p in leftovers)
    assert_same_weights(adapter(run), adapter(reference.output))


# -- fault injection: kill -9 at random points, many times ------------------------------------------------------

# Where a kill can land: between optimiser steps, and in every write the trainer makes (checkpoint tensors and state,
# the renames that publish them, the final adapter files and run.json).
WRITES = [("tuneforge.run.checkpoint", "save_file"), ("tuneforge.run.checkpoint", "torch.save"),
          ("tuneforge.methods.adapter_files", "save_file"), ("os", "replace"), ("pathlib.Path", "rename")]


def run_and_maybe_die(cfg, tokenizer, kill_at: int) -> None:
    """In a forked child: train, and ``os._exit(137)`` at the ``kill_at``-th fault point (mid-write for file
    writes: half the bytes land first). Exits 0 when the run finished before that point."""
    import importlib
    import pathlib

    import safetensors.torch

    from tuneforge.run.trainer import Trainer

    count = {"n": 0}

    def maybe_die(path=None):
        count["n"] += 1
        if count["n"] == kill_at:
            if path is not None and os.path.exists(path):  # a torn write
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])
            os._exit(137)

    def counting(fn, path_arg):
        def wrapper(*args, **kwargs):
            maybe_die()
            result = fn(*args, **kwargs)
            maybe_die(str(args[path_arg]) if path_arg is not None and len(args) > path_arg else None)
            return result
        return wrapper

    ckpt_module = importlib.import_module("tuneforge.run.checkpoint")
    files_module = importlib.import_module("tuneforge.methods.adapter_files")
    ckpt_module.save_file = counting(safetensors.torch.save_file, 1)
    files_module.save_file = counting(safetensors.torch.save_file, 1)
    torch.save = counting(torch.save, 1)
    os.replace = counting(os.replace, 1)
    pathlib.Path.rename = counting(pathlib.Path.rename, 1)
    step = Trainer.optimizer_step
    Trainer.optimizer_step = lambda self, batches, i: (maybe_die(), step(self, batches, i))[1]
    train(cfg, tokenizer)


def test_kill_at_random_points_then_resume_reaches_the_uninterrupted_weights(tmp_path, tokenizer, sft_file):
    common = dict(max_steps=5, save_every=1, keep_checkpoints=2)
    reference = train(config(tmp_path, sft_file, "reference", **common), tokenizer)
    ref_log = [json.loads(line)["loss"] for line in (reference.output / "metrics.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    kills = 0
    for trial in range(3):
        name, attempts, finished = f"run{trial}", 0, False
        while not finished:
            attempts += 1
            assert attempts < 30, "the run never finished"
            cfg = config(tmp_path, sft_file, name, resume=attempts > 1, **common)
            pid = os.fork()
            if pid == 0:
                try:
                    run_and_maybe_die(cfg, tokenizer, kill_at=rng.randint(1, 40) + trial)
                except BaseException:  # noqa: BLE001 — report, and never run pytest's teardown in a child
                    import traceback

                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            assert code in (0, 137), f"the run failed with exit code {code} (not a kill)"
            kills += code == 137
            finished = code == 0
        run = tmp_path / name
        assert_same_weights(adapter(run), adapter(reference.output))
        log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["loss"] for m in log] == pytest.approx(ref_log, abs=1e-6)
        assert ckpt.read_run_record(run)["finished"] is True
    assert kills >= 3  # the test did kill runs


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", qa_rows())


# -- 6. a local base is recorded by absolute path and content fingerprint --------------------------------------


def test_a_relative_base_path_is_recorded_absolute_and_a_changed_base_warns(tmp_path, tiny_model_dir, tokenizer,
                                                                           monkeypatch, capsys, caplog):
    import shutil

    import yaml

    shutil.copytree(tiny_model_dir, tmp_path / "mdl" / "tiny")
    write_jsonl(tmp_path / "sft.jsonl", qa_rows())
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "train", "--model", "mdl/tiny", "--data", "sft.jsonl", "--output", "runs/r",
                    "--max-steps", "1", "--batch-size", "4", "--progress", "false", "--eval-generate", "false")
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "runs/r/tuneforge.yaml").read_text())["model"] == str(tmp_path / "mdl/tiny")
    meta = json.loads((tmp_path / "runs/r/tuneforge_adapter.json").read_text())
    assert meta["base_model_fingerprint"].startswith("v1:")

    monkeypatch.chdir(tmp_path / "runs")  # from another folder, "mdl/tiny" would not exist
    assert cli(capsys, "generate", "--adapter", "r", "--prompt", "hi", "--max-new-tokens", "2")[0] == 0
    assert "trained on a different base model" not in caplog.text

    # The same path now holds another model: loading still works, and says so.
    make_tiny_model("llama", len(tokenizer), seed=1).save_pretrained(tmp_path / "mdl/tiny")
    assert cli(capsys, "generate", "--adapter", "r", "--prompt", "hi", "--max-new-tokens", "2")[0] == 0
    assert "trained on a different base model" in caplog.text
