"""Distributed training on CPU: 2 gloo processes under torchrun reach the weights one process reaches on the same
global batch (DDP and FSDP2, full DPO with its sharded reference too), every objective runs, only rank 0 writes, one
rank's failure stops the job, a run stopped after a checkpoint resumes (on 2 ranks, or an FSDP checkpoint on 1
process) to the uninterrupted weights, and each FSDP rank holds the shards the memory model projects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
import tuneforge.commands.main
from tuneforge.run import checkpoint as ckpt
from tuneforge.run.distributed import Distributed
from tuneforge.choose.recommend import memory_breakdown, model_shape

from conftest import qa_rows, write_jsonl

WORKER = Path(__file__).with_name("distributed_worker.py")
MEASURED = "full_dpo_fsdp_state"  # distributed_worker.py writes <MEASURED>.rank<r>.json


def torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def base(model_dir: Path, data: Path, output: Path, **extra) -> dict:
    return {"model": str(model_dir), "data": str(data), "output": str(output), "max_steps": 3, "batch_size": 4,
            "learning_rate": 1e-2, "max_length": 64, "progress": False, "seed": 0, "warmup_steps": 0,
            "eval_generate": False, "eval_before": False, "device": "cpu", **extra}


def preference_rows(n: int = 8) -> list[dict]:
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return [{"prompt": f"Say {i % 10} in words.", "chosen": words[i % 10], "rejected": words[(i + 1) % 10]}
            for i in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Every 2-rank run, in one torchrun start-up; returns the directory that holds them."""
    root = tmp_path_factory.mktemp("dist")
    sft = write_jsonl(root / "sft.jsonl", qa_rows(12))
    evals = write_jsonl(root / "eval.jsonl", qa_rows(5))
    pairs = write_jsonl(root / "pairs.jsonl", preference_rows())
    reward = root / "reward.py"
    reward.write_text("def reward(prompts, completions, **fields):\n    return [float(len(c)) for c in completions]\n")
    configs = {
        "lora_sft": base(tiny_model_dir, sft, root / "lora_sft", eval_data=str(evals), micro_batch_size=1,
                         method_options={"lora_dropout": 0.0}),
        "lora_dpo": base(tiny_model_dir, pairs, root / "lora_dpo", objective="dpo",
                         method_options={"lora_dropout": 0.0}),
        "full_sft_fsdp": base(tiny_model_dir, sft, root / "full_sft_fsdp", method="full", learning_rate=1e-3),
        # Full fine-tuning with DPO: the frozen reference copy is sharded by FSDP too.
        "full_dpo_fsdp": base(tiny_model_dir, pairs, root / "full_dpo_fsdp", objective="dpo", method="full",
                              distributed="fsdp", learning_rate=1e-3),
        "lora_sft_fsdp": base(tiny_model_dir, sft, root / "lora_sft_fsdp", distributed="fsdp",
                              method_options={"lora_dropout": 0.0}),
        "ppo": base(tiny_model_dir, pairs, root / "ppo", objective="ppo", max_steps=2,
                    objective_options={"reward_function": f"{reward}:reward", "max_new_tokens": 4,
                                       "num_ppo_epochs": 1}),
        # FSDP: every decoding step all-gathers the weights, so ranks whose samples stop at different lengths must
        # keep stepping together (12 new tokens of a random model: EOS comes at different steps per rank).
        "ppo_fsdp": base(tiny_model_dir, pairs, root / "ppo_fsdp", objective="ppo", max_steps=2, distributed="fsdp",
                         objective_options={"reward_function": f"{reward}:reward", "max_new_tokens": 12,
                                            "num_ppo_epochs": 1}),
        # Dropout on: a resume must restore every rank's own random stream. 4 steps of 4 cross the epoch of 12.
        "lora_dropout": base(tiny_model_dir, sft, root / "lora_dropout", max_steps=4,
                             method_options={"lora_dropout": 0.1}),
    }
    # Stopped as a step begins, after a checkpoint (kill_test_resumed resumes them in fresh processes): DDP one step
    # past its checkpoint, FSDP (full fine-tuning: sharded weights and optimiser state) right after its newest one.
    configs["lora_dropout_killed"] = {**configs["lora_dropout"], "output": str(root / "lora_dropout_killed"),
                                      "save_every": 2, "_stop_before_step": 3}
    configs["full_fsdp_killed"] = {**configs["full_sft_fsdp"], "output": str(root / "full_fsdp_killed"),
                                   "save_every": 1, "_stop_before_step": 2}
    # The full DPO run also records what each rank holds after its first step, for the memory model's check.
    launched = [{**c, "_measure_state": str(root / MEASURED)} if name == "full_dpo_fsdp" else c
                for name, c in configs.items()]
    done = torchrun([str(WORKER), json.dumps(launched)], cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, configs


def single_process(config: dict, output: Path) -> Path:
    # One process, the same global batch: accumulation replaces the second rank.
    result = tuneforge.train(tuneforge.load_config(None, {**config, "output": str(output), "micro_batch_size": 2
                                                          if config.get("micro_batch_size") is None else 1}))
    return result.output


def weights_file(run: Path) -> Path:
    adapter = run / "adapter_model.safetensors"
    return adapter if adapter.exists() else run / "model.safetensors"


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(weights_file(run)))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


# DPO packs a rank's pair into a row, the single process both pairs into one: sums in another order (1e-6 relative
# after AdamW's normalisation of near-zero gradients). LoRA SFT: all-reduced sums and accumulated ones differ in the
# last float32 bits, and AdamW's g / sqrt(v) magnifies that where a gradient is near zero: on an AVX2-only CPU one
# lora_A element of 512 ends 2.9e-5 apart (on an AVX512 CPU all were within 1e-6). A wrong reduction (a missing
# average, a rank's batch dropped) moves every element by about the learning rate (1e-2 here), far beyond 5e-5.
@pytest.mark.parametrize("name, atol", [("lora_sft", 5e-5), ("lora_dpo", 1e-5), ("lora_sft_fsdp", 1e-5),
                                        ("full_sft_fsdp", 1e-5), ("full_dpo_fsdp", 1e-5)])
def test_two_ranks_reach_the_single_process_weights(runs, tmp_path, name, atol):
    root, configs = runs
    single = single_process(configs[name], tmp_path / "single")
    assert_same_weights(root / name, single, atol)


def test_fsdp_ranks_hold_the_sharded_state_the_memory_model_projects(runs, tiny_model_dir):
    """Full DPO under FSDP2 on 2 ranks: the bytes each rank holds of the weights, gradients, AdamW moments and the
    frozen reference (local shards, after the first step) are recommend's per-rank terms; the reference is sharded
    whole, its root unit too (FSDP2 would keep a forward-only root all-gathered)."""
    root, _ = runs
    projected = memory_breakdown(model_shape(str(tiny_model_dir), ("full",)), "full", "dpo", world_size=2,
                                 strategy="fsdp")
    held = [json.loads(path.read_text()) for path in sorted(root.glob(f"{MEASURED}.rank*.json"))]
    assert [h["rank"] for h in held] == [0, 1]
    for rank in held:
        assert rank["unsharded_reference"] == []
        for part in ("parameters", "gradients", "optimizer", "reference"):
            assert rank[part] / 2**20 == pytest.approx(projected[part], rel=0.03), (rank["rank"], part)
    for part in ("parameters", "gradients", "optimizer", "reference"):  # the shards add up to the whole, exactly
        assert sum(h[part] for h in held) / 2**20 == pytest.approx(2 * projected[part], rel=1e-9), part


def test_eval_loss_is_gathered_over_ranks(runs, tmp_path):
    root, configs = runs
    single = single_process(configs["lora_sft"], tmp_path / "single")
    last = [json.loads(line) for line in (root / "lora_sft" / "metrics.jsonl").read_text().splitlines()][-1]
    expected = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)


def test_only_rank_zero_writes_and_ppo_runs(runs):
    root, _ = runs
    for name in ("lora_sft", "lora_dpo", "ppo", "ppo_fsdp"):
        run = root / name
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps == sorted(set(steps))  # one writer: no step logged twice
        assert json.loads((run / "run.json").read_text())["finished"] is True
        assert not list(run.glob(".*tmp*"))
    for name in ("ppo", "ppo_fsdp"):
        ppo = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in ppo if "loss" in r] == [1, 2]
        assert all("reward" in r and "kl" in r for r in ppo if "loss" in r)


def test_local_batch_and_shards_cover_the_global_batch():
    ranks = [Distributed("ddp", None, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].local_batch(8, None) == (4, 1)
    assert ranks[0].local_batch(8, 2) == (2, 2)
    batch = list(range(8))
    assert sorted(ranks[0].shard(batch) + ranks[1].shard(batch)) == batch
    with pytest.raises(ValueError, match="not a multiple of the 2 ranks"):
        ranks[0].local_batch(5, None)


@pytest.mark.parametrize("flags, message", [
    (["--nproc-per-node", "2", "--lora-r", "many"], "r: Input should be a valid integer"),
    (["--nproc-per-node", "2", "--batch-size", "3"],
     "batch_size 3 (the global batch) is not a multiple of the 2 ranks"),
    (["--nproc-per-node=2", "--batch-size", "12", "--micro-batch-size", "4"],
     "batch_size 12 / 2 ranks = 6 examples per rank, not a multiple of micro_batch_size 4"),
    (["--nproc-per-node", "2", "--streaming", "--max-steps", "2"], "--streaming runs in one process"),
    (["--nproc-per-node", "0"], "--nproc-per-node needs a positive number of processes, got '0'"),
    (["--nproc-per-node", "abc"], "--nproc-per-node needs a positive number of processes, got 'abc'"),
])
def test_bad_input_under_nproc_per_node_is_one_line_before_any_worker_starts(tmp_path, sft_file, capsys,
                                                                             monkeypatch, flags, message):
    def no_workers(*args):
        raise AssertionError("torchrun was started for a run the parent process could have refused")

    monkeypatch.setattr("tuneforge.run.distributed.launch_torchrun", no_workers)
    code = tuneforge.commands.main.main(["train", "--model", str(tmp_path / "never-loaded"), "--data", str(sft_file),
                               "--output", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tuneforge: error: ") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()  # one line, nothing made


def test_a_valid_run_under_nproc_per_node_is_launched_with_its_arguments(tmp_path, sft_file, monkeypatch):
    launched = []
    monkeypatch.setattr("tuneforge.run.distributed.launch_torchrun", lambda n, args: launched.append((n, args)) or 0)
    args = ["--data", str(sft_file), "--batch-size", "4", "--output", str(tmp_path / "run")]
    assert tuneforge.commands.main.main(["train", "--nproc-per-node", "2", *args]) == 0
    assert launched == [(2, ["train", *args])] and not (tmp_path / "run").exists()


def test_cli_launches_torchrun_and_a_failing_rank_stops_all(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(8))
    bad = write_jsonl(tmp_path / "bad.jsonl", [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--model", str(tiny_model_dir), "--max-steps", "1", "--batch-size", "4", "--max-length", "64",
            "--progress", "false", "--eval-generate", "false", "--device", "cpu"]
    ok = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--nproc-per-node", "2", "--data", str(data),
                         "--output", str(tmp_path / "run"), *args], env=env, capture_output=True, text=True,
                        timeout=240)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.count("trained 1 steps") == 1  # rank 0 alone prints
    failed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--nproc-per-node", "2", "--data",
                             str(bad), "--output", str(tmp_path / "bad"), *args], env=env, capture_output=True,
                            text=True, timeout=240)
    assert failed.returncode != 0
    assert "tuneforge: error" in failed.stderr


# -- kill and resume ---------------------------------------------------------------------------------------------

KILLED = {"lora_dropout_killed": ("lora_dropout", 1e-6), "full_fsdp_killed": ("full_sft_fsdp", 1e-5)}
RESUMED_FROM = 2  # the newest checkpoint each stopped run left


def logged_steps(run: Path, marked: bool | None = None) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r and (marked is None or r.get("before_kill", False) == marked)]


@pytest.fixture(scope="module")
def kill_test_resumed(runs):
    """The stopped runs resumed with --resume, both in one torchrun start-up (fresh processes: nothing but the
    checkpoints carries over). The FSDP run's checkpoints are copied first, for the one-process resumes."""
    root, configs = runs
    for name in KILLED:
        run = root / name
        assert not weights_file(run).exists(), name  # stopped mid-way
        assert ckpt.latest_checkpoint(run).name == f"step-{RESUMED_FROM}", name
        # Mark what the stopped run logged: a resume keeps the records up to its checkpoint and logs the rest anew
        # (a run that silently started over would keep none).
        lines = (run / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("".join(json.dumps({**json.loads(x), "before_kill": True}) + "\n"
                                                   for x in lines))
    assert ckpt.is_sharded(ckpt.latest_checkpoint(root / "full_fsdp_killed"))
    shutil.copytree(root / "full_fsdp_killed", root / "full_fsdp_stopped")
    resumes = [{**{k: v for k, v in configs[name].items() if k != "_stop_before_step"}, "resume": True}
               for name in KILLED]
    done = torchrun([str(WORKER), json.dumps(resumes)], cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, configs


@pytest.mark.parametrize("name", list(KILLED))
def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_weights(kill_test_resumed, name):
    root, configs = kill_test_resumed
    reference, atol = KILLED[name]
    assert_same_weights(root / name, root / reference, atol)
    assert logged_steps(root / name) == list(range(1, configs[reference]["max_steps"] + 1))
    assert logged_steps(root / name, marked=True) == list(range(1, RESUMED_FROM + 1))  # it resumed, not restarted


@pytest.mark.parametrize("damaged", [False, True])
def test_a_two_rank_fsdp_checkpoint_resumes_on_one_process(kill_test_resumed, tmp_path, damaged):
    """DCP reshards the 2-rank checkpoint into whole tensors; a damaged newest one falls back to the one before."""
    root, configs = kill_test_resumed
    run = tmp_path / "run"
    shutil.copytree(root / "full_fsdp_stopped", run)
    if damaged:
        shard = next((ckpt.latest_checkpoint(run) / ckpt.SHARDED).glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])  # torn after it was written
    tuneforge.train(tuneforge.load_config(None, {**configs["full_sft_fsdp"], "output": str(run), "resume": True}))
    assert_same_weights(run, root / "full_sft_fsdp", 1e-5)
    start = RESUMED_FROM - 1 if damaged else RESUMED_FROM
    assert logged_steps(run, marked=True) == list(range(1, start + 1))
    assert logged_steps(run, marked=False) == list(range(start + 1, 4))


def test_an_fsdp_runs_adapter_loads_on_one_process(runs):
    from tuneforge.inference.loading import load_for_inference

    root, configs = runs
    model, _, handle = load_for_inference(configs["lora_sft_fsdp"]["model"], root / "lora_sft_fsdp", device="cpu")
    saved = weights(root / "lora_sft_fsdp")
    state = handle.state_dict()
    assert state.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(state[key], saved[key], atol=0, rtol=0)
