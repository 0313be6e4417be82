"""``tuneforge eval`` on preference pairs: DPO's implicit-reward accuracy and margins against the adapter-off
reference (the same numbers objectives/dpo.py's loss computes), and a reward model's accuracy."""

from __future__ import annotations

import json

import pytest
import torch

import tuneforge
from conftest import make_tiny_model, write_jsonl
from tuneforge.commands.main import main
from tuneforge.data.formats import load_examples
from tuneforge.data.template import ensure_chat_template
from tuneforge.run.evaluate_preferences import pair_logps, preference_metrics
from tuneforge.objectives.dpo import dpo_loss
from tuneforge.objectives.reward import load_reward_model

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": "No idea."}
         for a in range(3) for b in range(2)]


def test_implicit_reward_matches_the_dpo_loss_rewards(tokenizer):
    ensure_chat_template(tokenizer)
    model = make_tiny_model("llama", len(tokenizer))
    handle = tuneforge.attach(model, tuneforge.LoRAConfig(r=4, init_lora_weights=False))
    examples = [tuneforge.data.formats.normalise(r, "preference", f"p:{i}") for i, r in enumerate(PAIRS)]
    result = preference_metrics(model, tokenizer, examples, reference=lambda: _off(handle, model), beta=0.2)
    policy = pair_logps(model, tokenizer, examples)
    with handle.disabled():
        reference = pair_logps(model, tokenizer, examples)
    _, chosen, rejected = dpo_loss(policy[0], policy[1], reference[0], reference[1], beta=0.2)
    assert result["implicit_reward_margin"] == pytest.approx(float((chosen - rejected).mean()), rel=1e-5)
    assert result["implicit_reward_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert result["logp_accuracy"] == pytest.approx(float((policy[0] > policy[1]).float().mean()))
    assert result["n"] == len(PAIRS) and result["implicit_reward_margin"] != 0


class _off:
    def __init__(self, handle, model):
        self.handle, self.model = handle, model

    def __enter__(self):
        self.context = self.handle.disabled()
        self.context.__enter__()
        return self.model

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


def test_eval_cli_on_pairs_reports_reward_model_accuracy(tmp_path, tiny_model_dir, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = tuneforge.load_config(None, {
        "model": str(tiny_model_dir), "data": str(pairs), "objective": "reward", "output": str(tmp_path / "rm"),
        "max_steps": 1, "batch_size": 2, "max_length": 64, "progress": False, "general_eval": None})
    tuneforge.train(config)
    assert main(["eval", "--adapter", str(tmp_path / "rm"), "--data", str(pairs), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    scorer = load_reward_model(None, tmp_path / "rm", device="cpu")
    examples = load_examples(pairs)
    chosen = torch.tensor(scorer.score([e.messages for e in examples], [e.chosen for e in examples]))
    rejected = torch.tensor(scorer.score([e.messages for e in examples], [e.rejected for e in examples]))
    assert result["reward_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert result["reward_margin"] == pytest.approx(float((chosen - rejected).mean()), rel=1e-4)


def test_eval_cli_on_pairs_reports_implicit_reward_of_a_dpo_run(tmp_path, tiny_model_dir, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = tuneforge.load_config(None, {
        "model": str(tiny_model_dir), "data": str(pairs), "objective": "dpo", "dpo_beta": 0.3,
        "output": str(tmp_path / "dpo"), "max_steps": 2, "batch_size": 2, "max_length": 64, "learning_rate": 5e-2,
        "progress": False, "general_eval": None})
    tuneforge.train(config, *tuneforge.load_model(str(tiny_model_dir), device="cpu"))
    assert main(["eval", "--adapter", str(tmp_path / "dpo"), "--data", str(pairs), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["beta"] == 0.3 and result["n"] == len(PAIRS)
    assert 0.0 <= result["implicit_reward_accuracy"] <= 1.0 and result["implicit_reward_margin"] != 0
