"""SimPO: the loss equals TRL's CPOTrainer.cpo_loss with loss_type="simpo" (trl.experimental.cpo) on identical
length-normalised log-probabilities, in value and gradient; the objective needs no reference and trains."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import tuneforge
from conftest import make_tiny_model, write_jsonl
from tuneforge.config import RunConfig
from tuneforge.data.formats import normalise
from tuneforge.data.template import ensure_chat_template
from tuneforge.methods import attach
from tuneforge.methods.lora import LoRAConfig
from tuneforge.objectives import TrainContext, get_objective
from tuneforge.models.logprobs import sequence_logps
from tuneforge.objectives.simpo import SimPO, simpo_loss


def trl_simpo(chosen, rejected, beta, gamma, label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing, loss_type="simpo",
                              alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)[0]


@pytest.mark.parametrize("beta, gamma, smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.1, 0.5, 0.2)])
def test_loss_and_gradient_match_trl(beta, gamma, smoothing):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(1)
    chosen, rejected = -torch.rand(5, generator=g) * 3, -torch.rand(5, generator=g) * 3
    a = [t.clone().requires_grad_() for t in (chosen, rejected)]
    b = [t.clone().requires_grad_() for t in (chosen, rejected)]
    expected = trl_simpo(*a, beta, gamma, smoothing).mean()
    got = simpo_loss(*b, beta, gamma, smoothing).mean()
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, x.grad)


def test_objective_uses_mean_token_logps_and_no_reference(tokenizer):
    ensure_chat_template(tokenizer)
    model = make_tiny_model("llama", len(tokenizer))
    attach(model, LoRAConfig(r=4))
    obj = SimPO(tokenizer, {"beta": 2.0, "gamma": 0.5})
    example = normalise({"prompt": "Hi", "chosen": "hello there friend", "rejected": "no"}, "preference", "p:1")
    batch = obj.collate(obj.prepare([example], 64))
    loss, _ = obj.loss(model, batch, TrainContext())  # no handle: a reference would fail
    lengths = (batch["labels"][:, 1:] != -100).sum(-1)
    with torch.no_grad():
        c, r = (sequence_logps(model, batch) / lengths).chunk(2)
    torch.testing.assert_close(loss, simpo_loss(c, r, 2.0, 0.5).sum())
    assert not SimPO.needs_reference and get_objective("simpo") is SimPO


def test_trains_through_the_trainer(tiny_model_dir, tmp_path, single_thread):
    rows = [{"prompt": f"Say {i}.", "chosen": "yes indeed", "rejected": "no"} for i in range(8)]
    config = RunConfig(model=str(tiny_model_dir), method="lora", method_options={"r": 4}, objective="simpo",
                       data=str(write_jsonl(tmp_path / "prefs.jsonl", rows)), max_steps=10, batch_size=4,
                       learning_rate=1e-2, warmup_steps=0, output=str(tmp_path / "run"), eval_generate=False,
                       progress=False)
    tuneforge.train(config)
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "rewards/margins" in r]
    assert len(steps) == 10 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
