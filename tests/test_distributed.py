"""Distributed training on CPU: 2 gloo processes under torchrun reach the weights one process reaches on the same
global batch (DDP and FSDP2), every objective runs, only rank 0 writes, and one rank's failure stops the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
from tuneforge.distributed import Distributed

from conftest import qa_rows, write_jsonl

WORKER = Path(__file__).with_name("distributed_worker.py")


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
        "lora_sft_fsdp": base(tiny_model_dir, sft, root / "lora_sft_fsdp", distributed="fsdp",
                              method_options={"lora_dropout": 0.0}),
        "ppo": base(tiny_model_dir, pairs, root / "ppo", objective="ppo", max_steps=2,
                    objective_options={"reward_function": f"{reward}:reward", "max_new_tokens": 4,
                                       "num_ppo_epochs": 1}),
    }
    done = torchrun([str(WORKER), json.dumps(list(configs.values()))], cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, configs


def single_process(config: dict, output: Path) -> Path:
    # One process, the same global batch: accumulation replaces the second rank.
    result = tuneforge.train(tuneforge.load_config(None, {**config, "output": str(output), "micro_batch_size": 2
                                                          if config.get("micro_batch_size") is None else 1}))
    return result.output


def weights(run: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(run / name))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("name, atol", [("lora_sft", 1e-6), ("lora_dpo", 1e-6), ("lora_sft_fsdp", 1e-5),
                                        ("full_sft_fsdp", 1e-5)])
def test_two_ranks_reach_the_single_process_weights(runs, tmp_path, name, atol):
    root, configs = runs
    single = single_process(configs[name], tmp_path / "single")
    assert_same_weights(root / name, single, atol)


def test_eval_loss_is_gathered_over_ranks(runs, tmp_path):
    root, configs = runs
    single = single_process(configs["lora_sft"], tmp_path / "single")
    last = [json.loads(line) for line in (root / "lora_sft" / "metrics.jsonl").read_text().splitlines()][-1]
    expected = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)


def test_only_rank_zero_writes_and_ppo_runs(runs):
    root, _ = runs
    for name in ("lora_sft", "lora_dpo", "ppo"):
        run = root / name
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps == sorted(set(steps))  # one writer: no step logged twice
        assert json.loads((run / "run.json").read_text())["finished"] is True
        assert not list(run.glob(".*tmp*"))
    ppo = [json.loads(line) for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward" in r and "kl" in r for r in ppo if "loss" in r)


def test_local_batch_and_shards_cover_the_global_batch():
    ranks = [Distributed("ddp", None, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].local_batch(8, None) == (4, 1)
    assert ranks[0].local_batch(8, 2) == (2, 2)
    batch = list(range(8))
    assert sorted(ranks[0].shard(batch) + ranks[1].shard(batch)) == batch
    with pytest.raises(ValueError, match="not a multiple of the 2 ranks"):
        ranks[0].local_batch(5, None)


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
