"""``--context-parallel N`` (Ulysses all-to-all over heads, zig-zag chunks) on 2 gloo ranks: logits, loss, target
counts and gradients equal the single-process run on Llama (grouped-query attention) and Qwen2, packed rows whose
examples straddle the ranks' chunks and padded rows, full fine-tuning and LoRA; CLI runs on 2 ranks (LoRA under DDP,
full fine-tuning under FSDP2) reach the weights one process reaches; bad settings are one line and exit 2 before any
worker starts."""

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
from tuneforge.run.context_parallel import ContextParallel, check_context_parallel, zigzag_chunks
from tuneforge.errors import ConfigError
from tuneforge.objectives import get_objective

from conftest import make_tiny_model, qa_rows, tiny_config, write_jsonl

HERE = Path(__file__).parent


def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    done = torchrun([str(HERE / "context_parallel_worker.py"), str(tmp_path / "out.json")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert len(results) == 9  # llama / qwen2 x packed / padded x full / lora, and checkpointed + tiled
    for case, r in results.items():
        assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-5), case
        assert r["units"][0] == r["units"][1], case
        assert r["grad_names"], case
        assert r["grad_max_diff"] <= 1e-5 * max(1.0, r["grad_max"]) * 10, case
        assert r["logit_max_diff"] < 1e-5, case


def test_shard_zigzag_counts_and_segments():
    """Without a process group: the chunks, the shifted targets, the counts and the packed mask of one rank."""
    ids = torch.arange(10, 20)[None]
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    labels = ids.clone()
    labels[0, [0, 5]] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "example_ids": (positions * 0)[:, :]}
    halves = [ContextParallel(2, i).shard(batch) for i in range(2)]
    assert zigzag_chunks(2, 0) == (0, 3) and zigzag_chunks(2, 1) == (1, 2)
    # 10 tokens padded to 12, chunks of 3: rank 0 holds positions 0-2 and 9-11, rank 1 positions 3-8.
    assert halves[0]["input_ids"].tolist() == [[10, 11, 12, 19, 0, 0]]
    assert halves[1]["input_ids"].tolist() == [[13, 14, 15, 16, 17, 18]]
    # Targets are the labels shifted before sharding: position 3 predicts token 14 (on the same rank), the first
    # example's last token (position 4) predicts nothing: the next example's first token is unlabelled.
    assert halves[1]["targets"].tolist() == [[14, -100, 16, 17, 18, 19]]
    assert sum(ContextParallel.units(h) for h in halves) == int((labels[:, 1:] != -100).sum())
    assert sum(ContextParallel.tokens(h) for h in halves) == 10
    mask = halves[0]["cp_mask"][0, 0]  # the whole row's, in its own order: two examples, the padding in the last
    assert mask[4, 0] and not mask[5, 4] and mask[6, 5] and not mask[4, 6] and mask[11, 5] and not mask[11, 4]


def test_bad_settings_are_one_line_errors(tokenizer):
    from transformers import LlamaForCausalLM

    config = tiny_config("llama", len(tokenizer))  # 4 heads
    with pytest.raises(ConfigError, match="heads do not divide by 3"):
        check_context_parallel(3, 3, config, LlamaForCausalLM)
    with pytest.raises(ConfigError, match="does not divide the 3 ranks"):
        check_context_parallel(2, 3, config, LlamaForCausalLM)
    with pytest.raises(ConfigError, match="torchrun"):
        check_context_parallel(2, 1, config, LlamaForCausalLM)

    class OwnAttention(torch.nn.Module):
        _supports_attention_backend = False

    with pytest.raises(ConfigError, match="OwnAttention does not compute attention through"):
        check_context_parallel(2, 2, config, OwnAttention)
    with pytest.raises(ConfigError, match="dpo objective reads whole sequences"):
        check_context_parallel(2, 2, config, LlamaForCausalLM, get_objective("dpo"))
    with pytest.raises(ConfigError, match="prompt_tuning cannot split"):
        check_context_parallel(2, 2, config, LlamaForCausalLM, get_objective("sft"),
                               tuneforge.get_method("prompt_tuning"))
    assert make_tiny_model("llama", len(tokenizer))  # the tiny model itself is fine with 2


@pytest.mark.parametrize("extra, message", [
    (["--nproc-per-node", "2", "--context-parallel", "3"], "does not divide the 2 ranks"),
    (["--nproc-per-node", "3", "--context-parallel", "3"], "heads do not divide by 3"),
    (["--context-parallel", "2"], "torchrun"),
    (["--nproc-per-node", "2", "--context-parallel", "2", "--objective", "dpo"], "dpo objective"),
])
def test_cli_refuses_before_any_worker_starts(extra, message, tiny_model_dir, sft_file, tmp_path, capsys):
    from tuneforge.commands.main import main

    code = main(["train", "--model", str(tiny_model_dir), "--data", str(sft_file), "--output", str(tmp_path / "r"),
                 "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err


@pytest.mark.slow
@pytest.mark.parametrize("method", [["--lora-r", "4"], ["--method", "full", "--distributed", "fsdp",
                                                       "--learning-rate", "1e-3"]], ids=["lora-ddp", "full-fsdp"])
def test_cli_run_on_two_ranks_reaches_the_single_process_weights(method, tiny_model_dir, tmp_path):
    """2 ranks, one context-parallel group (data-parallel world 1): the same global batches, the same updates; LoRA
    under DDP and full fine-tuning under FSDP2."""
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(8))
    evals = write_jsonl(tmp_path / "eval.jsonl", qa_rows(5))  # evaluation runs whole rows, each rank alone
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--eval-data", str(evals), "--max-steps", "2",
            "--batch-size", "4",
            "--learning-rate", "1e-2", "--max-length", "64", "--progress", "false", "--warmup-steps", "0",
            "--eval-generate", "false", "--eval-before", "false", "--general-eval", "none", "--device", "cpu",
            *method]
    from tuneforge.commands.main import main

    assert main(["train", *args, "--output", str(tmp_path / "one")]) == 0
    done = torchrun(["-m", "tuneforge", "train", *args, "--output", str(tmp_path / "two"), "--context-parallel", "2"],
                    tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = "adapter_model.safetensors" if "full" not in method else "model.safetensors"
    one, two = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert [r["tokens"] for r in logs[0] if "tokens" in r] == [r["tokens"] for r in logs[1] if "tokens" in r]
    assert [r["units"] for r in logs[0] if "units" in r] == [r["units"] for r in logs[1] if "units" in r]
    evals = [[r["eval_loss"] for r in log if "eval_loss" in r] for log in logs]
    assert len(evals[0]) == 1 and evals[1] == pytest.approx(evals[0], rel=1e-4)


@pytest.mark.slow
def test_stopped_context_parallel_run_resumes_to_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    """A 2-rank context-parallel run killed as step 3 begins (after its step-2 checkpoint) and resumed in fresh
    processes ends at the weights of the run that was never stopped (tests/distributed_worker.py does the kill)."""
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(8))
    run = {"model": str(tiny_model_dir), "data": str(data), "max_steps": 4, "batch_size": 4, "learning_rate": 1e-2,
           "max_length": 64, "progress": False, "warmup_steps": 0, "eval_generate": False, "eval_before": False,
           "general_eval": "none", "device": "cpu", "context_parallel": 2, "method_options": {"r": 4}}
    whole = {**run, "output": str(tmp_path / "whole")}
    stopped = {**run, "output": str(tmp_path / "stopped"), "save_every": 2, "_stop_before_step": 2}
    worker = str(HERE / "distributed_worker.py")
    done = torchrun([worker, json.dumps([whole, stopped])], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "stopped" / "adapter_model.safetensors").exists()
    resumed = {**run, "output": str(tmp_path / "stopped"), "save_every": 2, "resume": True}
    done = torchrun([worker, json.dumps([resumed])], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    two = load_file(tmp_path / "stopped" / "adapter_model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
