"""Side-by-side adapters (``adapters:``): each adapter's per-step losses, gradients and final weights are its own
single run's; each run folder loads as an ordinary run; what cannot share a base is refused with the reason."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tuneforge
from conftest import save_tiny_model_dir, write_jsonl
from tuneforge.errors import ConfigError
from tuneforge.run.multi_adapter import load_lanes, train_side_by_side

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = "zero one two three four five six seven eight nine".split()
LANES = [
    {"name": "r4", "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2, "seed": 0},
    {"name": "r8-qv", "lora_r": 8, "lora_alpha": 8, "learning_rate": 3e-3, "seed": 1,
     "lora_target_modules": ["q_proj", "v_proj"], "lr_scheduler": "constant", "max_grad_norm": 0.05},
    {"name": "r2", "lora_r": 2, "lora_alpha": 4, "learning_rate": 2e-2, "seed": 2, "weight_decay": 0.1},
]


def rows(n: int) -> list[dict]:
    """Answers 1 to 10 words long: packed rows and micro-batches of very different sizes per seed."""
    return [{"instruction": f"Count to {i % 10 + 1}.", "output": " ".join(WORDS[: i % 10 + 1])} for i in range(n)]


def shared(tmp_path, model_dir) -> dict:
    return dict(model=str(model_dir), data=str(write_jsonl(tmp_path / "train.jsonl", rows(12))),
                eval_data=str(write_jsonl(tmp_path / "eval.jsonl", rows(5))), max_steps=3, batch_size=4,
                micro_batch_size=2, max_length=64, packing=True, warmup_steps=1, progress=False,
                general_eval="none", eval_generate=False, dtype="float32", device="cpu")


def write_config(tmp_path, values: dict, lanes: list[dict]) -> str:
    path = tmp_path / "side.yaml"
    path.write_text(yaml.safe_dump({**values, "output": str(tmp_path / "side"), "adapters": lanes}))
    return str(path)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_adapter_equals_its_own_single_run(tmp_path, tokenizer, arch):
    model_dir = save_tiny_model_dir(tmp_path / "base", arch, copy.deepcopy(tokenizer))
    values = shared(tmp_path, model_dir)
    lanes = load_lanes(write_config(tmp_path, values, LANES))
    results = train_side_by_side(lanes)
    for lane, result in zip(lanes, results):
        single = tuneforge.train(lane.config.model_copy(update={"output": str(tmp_path / f"single-{lane.name}")}))
        side_log, single_log = metrics(result.output), metrics(single.output)
        assert [r["step"] for r in side_log] == [r["step"] for r in single_log]
        for a, b in zip(side_log, single_log):
            for key in ("loss", "grad_norm", "eval_loss", "lr", "units", "tokens"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (lane.name, a["step"], key)
        side, alone = load_file(result.output / "adapter_model.safetensors"), load_file(
            single.output / "adapter_model.safetensors")
        assert side.keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(side[key], alone[key], rtol=1e-4, atol=1e-6)
        assert json.loads((result.output / "adapter_config.json").read_text())["r"] == lane.config.method_options["r"]
        assert json.loads((result.output / "run.json").read_text())["finished"]
    assert results[0].metrics["trainable_params"] != results[1].metrics["trainable_params"]


def test_cli_trains_side_by_side_and_generate_loads_each(tmp_path, tokenizer):
    model_dir = save_tiny_model_dir(tmp_path / "base", "llama", copy.deepcopy(tokenizer))
    values = {**shared(tmp_path, model_dir), "max_steps": 1}
    config = write_config(tmp_path, values, LANES[:2])
    run = subprocess.run([sys.executable, "-m", "tuneforge", "train", config], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "adapter r4: 1 steps ->" in run.stdout and "adapter r8-qv: 1 steps ->" in run.stdout
    gen = subprocess.run([sys.executable, "-m", "tuneforge", "generate", "--adapter", str(tmp_path / "side" / "r8-qv"),
                          "--prompt", "Count to 3.", "--max-new-tokens", "3"], capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr


@pytest.mark.parametrize("lane, reason", [
    ({"method": "prompt_tuning"}, "not a plain LoRA update"),
    ({"method": "full"}, "changes the base weights"),
    ({"lora_use_dora": True}, "DoRA"),
    ({"lora_init": "pissa"}, "rewrites the shared base"),
    ({"max_length": 32}, "max_length differs"),
    ({"objective": "dpo"}, "not a sum of token cross-entropies"),
])
def test_what_cannot_share_a_base_is_refused_with_the_reason(tmp_path, lane, reason):
    config = write_config(tmp_path, {"max_steps": 1}, [{"name": "a"}, {"name": "b", **lane}])
    with pytest.raises(ConfigError, match=reason):
        load_lanes(config)


def test_refusal_is_one_line_and_exit_2(tmp_path):
    config = write_config(tmp_path, {"max_steps": 1}, [{"name": "a"}, {"name": "b", "method": "full"}])
    run = subprocess.run([sys.executable, "-m", "tuneforge", "train", config], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"tuneforge: error: {config}: adapter b: full changes the base weights, which side-by-side adapters share; "
        "train it on its own"]
