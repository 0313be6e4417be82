"""``tuneforge recommend``: parameter counts from the config alone, memory estimates held to 20% of measured peaks
(bench/results/memory_calibration_*.json, written by bench/memory_calibration.py), and the seeds' combination by
situation with a command or pipeline config that runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

import tuneforge
from tuneforge.commands.main import main
from tuneforge.run.pipeline import read_pipeline
from tuneforge.choose.recommend import (ModelShape, estimate_memory_mb, memory_breakdown, model_shape, parse_memory,
                                 recommend)

CALIBRATION = Path(__file__).parents[1] / "bench" / "results"


def test_counts_from_the_config_match_the_loaded_model(tiny_model_dir):
    shape = model_shape(str(tiny_model_dir))
    model, _ = tuneforge.load_model(str(tiny_model_dir), device="cpu")
    assert shape.params == sum(p.numel() for p in model.parameters())
    for method, config in (("lora", tuneforge.LoRAConfig()), ("prompt_tuning", None)):
        if config is None:
            from tuneforge.methods.base import METHODS

            config = METHODS.get(method).config_class.from_dict({})
            handle = METHODS.get(method).attach(copy.deepcopy(model), config)
        else:
            handle = tuneforge.attach(copy.deepcopy(model), config)
        assert shape.trainable[method] == handle.num_trainable_parameters()
    assert shape.trainable["full"] == shape.params and shape.trainable["qlora"] == shape.trainable["lora"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_estimates_are_within_20_percent_of_measured_peaks(device):
    path = CALIBRATION / f"memory_calibration_{device}.json"
    if not path.is_file():
        pytest.skip(f"no {path.name}: run bench/memory_calibration.py --device {device} on such a machine")
    data = json.loads(path.read_text())
    settings = dict(zip(data["settings"][::2], data["settings"][1::2]))
    shape = model_shape(settings["--model"], tuple(data["methods"]))
    assert len(data["methods"]) >= 3
    for method, measured in data["methods"].items():
        estimate = estimate_memory_mb(shape, method, "pretrain", gpu=device == "cuda",
                                      batch_size=int(settings["--batch-size"]),
                                      max_length=int(settings["--max-length"]))
        assert abs(estimate / measured["measured_mb"] - 1) <= 0.2, (method, estimate, measured)


def shape(params=1_000_000_000):
    return ModelShape("m", params, int(params * 0.8), 2048, 8192, 16, 128_000,
                      {"full": params, "lora": params // 100, "qlora": params // 100, "prompt_tuning": 40_960})


def test_the_seeds_combination_by_situation():
    assert recommend(shape(), "task", None)["method"] == "qlora"  # no GPU
    assert recommend(shape(), "task", parse_memory("80GB"))["method"] == "lora"  # some resources
    tight = recommend(shape(), "task", 3500, batch_size=1, max_length=512)
    assert tight["method"] == "qlora" and "QLoRA does" in tight["why"]
    assert "even QLoRA exceeds" in recommend(shape(), "task", 1000)["why"]
    assert recommend(shape(), "alignment", parse_memory("24 GiB"))["objectives"] == ["sft", "dpo"]


def test_multi_stage_recommendations_are_runnable_pipelines(tmp_path):
    result = recommend(shape(), "domain", None)
    path = tmp_path / "pipeline.yaml"
    path.write_text(result["run"])
    shared, stages = read_pipeline(path)
    assert [s["objective"] for s in stages] == ["pretrain", "sft"] and shared["method"] == "qlora"
    assert yaml.safe_load(path.read_text())["stages"][0]["data"][1] == "general:0.2"  # replay mixed in


def test_gpu_memory_parsing_names_bad_input():
    assert parse_memory("24GB") == 24 * 1024 and parse_memory("16000MB") == 16000
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_memory("lots")


def test_recommend_command_prints_estimates_and_the_command(tiny_model_dir, capsys):
    assert main(["recommend", "--model", str(tiny_model_dir), "--gpu-memory", "24GB", "--goal", "task"]) == 0
    out = capsys.readouterr().out
    assert "recommended: SFT with lora" in out and f"tuneforge train --model {tiny_model_dir} --method lora" in out


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "-5"], "--batch-size must be a positive integer, got -5"),
    (["--max-length", "0"], "--max-length must be a positive integer, got 0"),
    (["--gpu-memory", "24GB", "--gpu", "nosuchgpu"], "--gpu: no throughput known for 'nosuchgpu'; known GPUs: h100"),
    (["--gpu-memory", "0GB"], "--gpu-memory: expected a size such as 24GB or 16000MB, got '0GB'"),
])
def test_recommend_refuses_what_no_estimate_can_mean(tmp_path, capsys, flags, message):
    assert main(["recommend", "--model", str(tmp_path / "never-read"), *flags]) == 2  # checked before the model
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("tuneforge: error: ") and message in err and len(err.splitlines()) == 1


def test_a_gpu_name_is_case_blind_and_without_gpu_memory_says_the_estimate_is_the_cpus(tiny_model_dir, capsys,
                                                                                      caplog):
    assert main(["recommend", "--model", str(tiny_model_dir), "--gpu-memory", "24GB", "--gpu", "H100"]) == 0
    assert "GPU with 24 GB" in capsys.readouterr().out
    with caplog.at_level("WARNING", logger="tuneforge.choose.recommend"):
        assert main(["recommend", "--model", str(tiny_model_dir), "--gpu", "h100"]) == 0
    assert "--gpu h100 without --gpu-memory: estimating for the CPU" in caplog.text


# -- per-rank memory: DDP replicas, FSDP shards ------------------------------------------------------------------

CASES = [(method, objective, gpu) for method in ("full", "lora", "qlora", "prompt_tuning")
         for objective in ("sft", "dpo") for gpu in (False, True)]


@pytest.mark.parametrize("method, objective, gpu", CASES)
def test_the_breakdown_sums_to_the_estimate_and_one_ddp_rank_is_one_device(method, objective, gpu):
    s = shape()
    one = estimate_memory_mb(s, method, objective, gpu=gpu, batch_size=2, max_length=256)
    parts = memory_breakdown(s, method, objective, gpu=gpu, batch_size=2, max_length=256)
    assert sum(parts.values()) == pytest.approx(one, rel=1e-12)
    for world in (1, 8):  # DDP: every rank a whole replica
        assert estimate_memory_mb(s, method, objective, gpu=gpu, batch_size=2, max_length=256, world_size=world,
                                  strategy="ddp") == one


@pytest.mark.parametrize("method, objective, gpu", CASES)
def test_fsdp_divides_the_sharded_state_by_the_ranks(method, objective, gpu):
    s, kwargs = shape(), dict(gpu=gpu, batch_size=2, max_length=256)
    one = memory_breakdown(s, method, objective, **kwargs)
    for world in (1, 2, 8):
        ranks = memory_breakdown(s, method, objective, world_size=world, strategy="fsdp", **kwargs)
        for part in ("parameters", "gradients", "optimizer", "reference"):
            assert ranks[part] == pytest.approx(one[part] / world, rel=1e-12), (part, world)
        assert ranks["activations"] == one["activations"] and ranks["logits"] == one["logits"]  # per micro-batch
        assert ranks["gathered"] > 0 and one["gathered"] == 0


def test_fsdp_terms_by_hand():
    # 100 Mi parameters: 96 Mi in 16 blocks of 6 Mi linear weights (+2 x 1024 norm weights), the rest the root.
    s = ModelShape("hand", 100 * 2**20, 96 * 2**20, 1024, 4096, 16, 32_000, {"full": 100 * 2**20})
    assert s.block_params == 6 * 2**20 + 2048 and s.root_params == 4 * 2**20 - 16 * 2048
    bf16 = memory_breakdown(s, "full", "dpo", gpu=True, world_size=4, strategy="fsdp", batch_size=1, max_length=1)
    # bf16 weights, gradients, two moments and the reference copy, a quarter each per rank (MB = MiB here).
    assert (bf16["parameters"], bf16["gradients"], bf16["optimizer"], bf16["reference"]) == (50, 50, 100, 50)
    # Root and two blocks gathered in bf16, root and one block's gradients in bf16, the block's also in float32.
    root, block = s.root_params / 2**20, s.block_params / 2**20
    assert bf16["gathered"] == pytest.approx((root + 2 * block) * 2 + (root + block) * 2 + block * 4)
    fp32 = memory_breakdown(s, "full", "sft", gpu=True, world_size=4, strategy="fsdp", fp32_master=True)
    assert (fp32["parameters"], fp32["gradients"], fp32["optimizer"]) == (100, 100, 200)  # 16 bytes / param / 4
    assert fp32["reference"] == 0


def test_bad_strategy_or_world_size_is_named():
    with pytest.raises(ValueError, match="strategy"):
        memory_breakdown(shape(), "lora", strategy="zero3", world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        memory_breakdown(shape(), "lora", world_size=2)


def test_published_llama_shapes_are_built_from_the_config_alone():
    from transformers import LlamaConfig

    from tuneforge.choose.recommend import shape_from_config

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    s = shape_from_config(config, "llama-3.1-8b", ("full",))
    assert s.params == 8_030_261_248  # Llama-3.1-8B's published parameter count
    assert s.layers * s.block_params + s.root_params == s.params
    assert s.root_params == 2 * 128256 * 4096 + 4096  # embeddings, head, final norm
