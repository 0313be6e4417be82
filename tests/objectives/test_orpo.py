"""ORPO: the odds-ratio term equals TRL's ORPOTrainer.odds_ratio_loss (trl.experimental.orpo) in value and
gradient, the full loss is NLL minus its mean, and the objective trains on preference pairs through the trainer."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import tuneforge
from conftest import write_jsonl
from tuneforge.config import RunConfig
from tuneforge.objectives import get_objective
from tuneforge.objectives.orpo import ORPO, odds_ratio_loss


def trl_odds_ratio(chosen, rejected, beta):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    return ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_odds_ratio_loss_and_gradient_match_trl(beta):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    # Mean token log-probs on both sides of -ln 2, where log1mexp switches formula.
    chosen = -torch.rand(6, generator=g) * 2
    rejected = -torch.rand(6, generator=g) * 2
    a = [t.clone().requires_grad_() for t in (chosen, rejected)]
    b = [t.clone().requires_grad_() for t in (chosen, rejected)]
    nll = torch.tensor(1.3)
    trl_losses, _, _, _, trl_log_odds = trl_odds_ratio(*a, beta)
    expected = nll - trl_losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    ours, log_odds = odds_ratio_loss(*b, beta)
    got = nll + ours.mean()
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(log_odds.mean(), trl_log_odds)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, x.grad)


def preference_rows(n=8):
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    return [{"prompt": f"Say {i} in words.", "chosen": words[i % 8], "rejected": words[(i + 3) % 8]}
            for i in range(n)]


def test_trains_through_the_trainer(tiny_model_dir, tmp_path, single_thread):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    config = RunConfig(model=str(tiny_model_dir), method="lora", method_options={"r": 4}, objective="orpo",
                       objective_options={"beta": 0.2}, data=str(data), max_steps=12, batch_size=4,
                       learning_rate=1e-2, warmup_steps=0, output=str(tmp_path / "run"), eval_generate=False,
                       progress=False)
    tuneforge.train(config)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "nll_loss" in r]
    assert len(steps) == 12 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["nll_loss"] < steps[0]["nll_loss"]
    assert get_objective("orpo") is ORPO
    with pytest.raises(ValueError, match="orpo beta must be positive"):
        ORPO(None, {"beta": 0})
