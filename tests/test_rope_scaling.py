"""``--rope-scaling linear|dynamic|yarn --rope-factor F``: the scaled model computes what transformers computes for a
model built with those rope parameters (logits past the trained length, the oracle), the scaling travels with the run
(a full model's config.json, an adapter run's tuneforge.yaml re-applied on loading), and bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

import tuneforge
from tuneforge.errors import ConfigError
from tuneforge.inference.loading import load_for_inference
from tuneforge.models.rope_scaling import apply_rope_scaling

from conftest import make_tiny_model


def oracle(model, kind: str, factor: float):
    """A model built by transformers from the scaled config, with ``model``'s weights."""
    from transformers import AutoModelForCausalLM

    config = type(model.config).from_dict(model.config.to_dict())
    original = config.max_position_embeddings
    config.rope_parameters = {**config.rope_parameters, "rope_type": kind, "factor": factor}
    if kind == "yarn":
        config.rope_parameters["original_max_position_embeddings"] = original
    built = AutoModelForCausalLM.from_config(config)
    built.load_state_dict(model.state_dict())
    return built.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_scaled_model_matches_transformers(arch, kind, tokenizer):
    model = make_tiny_model(arch, len(tokenizer))
    expected = oracle(model, kind, 4.0)
    apply_rope_scaling(model, kind, 4.0)
    assert model.config.rope_parameters["rope_type"] == kind and model.config.rope_parameters["factor"] == 4.0
    ids = torch.randint(4, len(tokenizer), (1, 300))  # past the 256 positions the tiny model was made with
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits)
        plain = make_tiny_model(arch, len(tokenizer))(input_ids=ids).logits
    assert kind == "dynamic" or not torch.allclose(plain, expected(input_ids=ids).logits)
    if kind != "dynamic":  # the context the model declares grows F-fold
        assert model.config.max_position_embeddings == 1024


def train_args(model_dir, data, output, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--max-steps", "1",
            "--batch-size", "2", "--max-length", "64", "--progress", "false", "--eval-generate", "false",
            "--general-eval", "none", "--device", "cpu", *extra]


def test_scaling_travels_with_adapter_and_full_runs(tiny_model_dir, sft_file, tmp_path):
    from tuneforge.commands.main import main

    assert main(train_args(tiny_model_dir, sft_file, tmp_path / "lora", "--rope-scaling", "yarn",
                           "--rope-factor", "2")) == 0
    model, _, handle = load_for_inference(str(tiny_model_dir), tmp_path / "lora", device="cpu")
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.rope_parameters["factor"] == 2.0
    assert handle is not None
    assert main(train_args(tiny_model_dir, sft_file, tmp_path / "full", "--method", "full", "--rope-scaling",
                           "linear", "--rope-factor", "4")) == 0
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "linear" and saved["rope_parameters"]["factor"] == 4.0
    model, _, _ = load_for_inference(str(tmp_path / "full"), tmp_path / "full", device="cpu")
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.max_position_embeddings == 1024


def test_scaling_survives_merge(tiny_model_dir, sft_file, tmp_path):
    from tuneforge.commands.main import main

    assert main(train_args(tiny_model_dir, sft_file, tmp_path / "lora", "--rope-scaling", "linear",
                           "--rope-factor", "2")) == 0
    assert main(["merge", str(tmp_path / "lora"), "--output", str(tmp_path / "merged")]) == 0
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "linear"


@pytest.mark.parametrize("overrides, message", [
    ({"rope_scaling": "linear"}, "rope_factor go together"),
    ({"rope_factor": 2.0}, "rope_factor go together"),
    ({"rope_scaling": "ntk", "rope_factor": 2.0}, "rope_scaling"),
    ({"rope_scaling": "linear", "rope_factor": 0.5}, "rope_factor"),
])
def test_bad_rope_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tuneforge.load_config(None, overrides)


def test_model_without_rotary_positions_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="no rotary position embedding"):
        apply_rope_scaling(make_tiny_model("gpt2", len(tokenizer)), "linear", 2.0)
