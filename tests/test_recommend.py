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
from tuneforge.cli import main
from tuneforge.pipeline import read_pipeline
from tuneforge.recommend import ModelShape, estimate_memory_mb, model_shape, parse_memory, recommend

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
