"""One shared check, run over every registered objective (new objectives are picked up automatically), each with a
method that packs examples into rows (LoRA) and one that prepends virtual tokens (prompt tuning):

records of the objective's kind → 2 optimiser steps through ``tuneforge.train`` on a tiny random Llama → finite
losses, the adapter's output moved away from the base → the saved adapter on a fresh copy of the base gives the
trained model's logits.

The records come from the kind the objective declares (``Objective.kinds``); an objective whose options have no
workable defaults (the online ones need a reward) finds them in ``NEEDED_OPTIONS``.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import tuneforge
from conftest import make_tiny_model, qa_rows, write_jsonl
from tuneforge.methods import get_method, load_adapter
from tuneforge.objectives import available_objectives, get_objective

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = "zero one two three four five six seven eight nine".split()

# A few records of each kind an objective can declare (data.formats.Example.kind).
RECORDS = {
    "chat": lambda: qa_rows(8),
    "text": lambda: [{"text": f"The quick brown fox jumps over {WORDS[i]} lazy dogs."} for i in range(8)],
    "preference": lambda: [{"prompt": f"Say {i} in words.", "chosen": WORDS[i], "rejected": WORDS[(i + 3) % 10]}
                           for i in range(8)],
    "unpaired": lambda: [{"prompt": f"Say {i}.", "completion": WORDS[i], "label": bool(i % 2)} for i in range(8)],
    "prompt": lambda: [{"prompt": f"Question {i}: what now?"} for i in range(8)],
}

LETTERS = "def letters(prompts, completions):\n    return [sum(ch.isalpha() for ch in c) / 8 for c in completions]\n"
# Options an objective cannot do without (``{reward}`` becomes the path of the reward function above), and short
# rollouts so that the online objectives stay quick.
NEEDED_OPTIONS = {
    "ppo": {"reward_function": "{reward}", "max_new_tokens": 4, "num_ppo_epochs": 1},
    "grpo": {"reward_functions": "{reward}", "max_new_tokens": 4, "num_generations": 2},
}

# The two kinds of trainable state every objective must work with.
METHODS = {
    "lora": {"r": 4},  # packs several examples into one row where the objective allows it
    "prompt_tuning": {"num_virtual_tokens": 4},  # virtual tokens in front of every row; never packs
}


def test_the_methods_are_one_of_each_kind():
    assert get_method("lora").packing_refusal is None
    assert get_method("prompt_tuning").packing_refusal is not None


def objective_options(name: str, tmp_path) -> dict:
    (tmp_path / "rewards.py").write_text(LETTERS)
    reward = f"{tmp_path / 'rewards.py'}:letters"
    return {k: v.format(reward=reward) if isinstance(v, str) else v for k, v in NEEDED_OPTIONS.get(name, {}).items()}


def records_for(name: str) -> list[dict]:
    kind = get_objective(name).kinds[0]
    assert kind in RECORDS, f"objective {name} trains on {kind!r} records: add a few to RECORDS"
    return RECORDS[kind]()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])).logits


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("objective", available_objectives())
def test_objective_contract(objective, method, tmp_path, tokenizer):
    config = tuneforge.load_config(None, {
        "objective": objective, "objective_options": objective_options(objective, tmp_path),
        "method": method, "method_options": METHODS[method],
        "data": str(write_jsonl(tmp_path / "data.jsonl", records_for(objective))), "output": str(tmp_path / "run"),
        "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 0, "max_length": 64,
        "seed": 0, "general_eval": "none", "eval_generate": False, "progress": False, "dtype": "float32",
        "device": "cpu"})
    base = logits(make_tiny_model("llama", len(tokenizer)))
    result = tuneforge.train(config, make_tiny_model("llama", len(tokenizer)), copy.deepcopy(tokenizer))

    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in log if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in steps), steps
    trained = logits(result.model)
    assert not torch.allclose(trained, base, atol=1e-6), "two steps did not change the adapted model's output"

    fresh = make_tiny_model("llama", len(tokenizer))
    loaded = load_adapter(fresh, tmp_path / "run")
    assert loaded.num_trainable_parameters() == result.handle.num_trainable_parameters()
    torch.testing.assert_close(logits(fresh), trained, atol=1e-6, rtol=1e-6)
    with loaded.disabled():
        assert torch.equal(logits(fresh), base)
