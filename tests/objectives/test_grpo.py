"""GRPO: the loss and its gradient equal TRL's GRPOTrainer._compute_loss on identical log-probabilities for every
loss type (called on a stand-in trainer); group advantages as TRL computes them; rollouts (G completions per
prompt, weighted rewards, the disabled adapter as reference); and a run through the trainer."""

from __future__ import annotations

import json
import math
from collections import defaultdict
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
from tuneforge.objectives.grpo import GRPO, aggregate, group_advantages, grpo_token_losses, loss_units

# -- TRL oracle: GRPOTrainer._compute_loss on given per-token log-probs ------------------------------------


def trl_grpo(per_token_logps, mask, advantages, old_logps, ref_logps, *, loss_type, beta, epsilon=0.2,
             epsilon_high=None, max_completion_length=8):
    """TRL's own loss code, with a stand-in for the forward that returns ``per_token_logps`` as the policy's."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = per_token_logps.shape
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, num_processes=1,
                                  reduce=lambda x, reduction="sum": x, sync_gradients=True)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        accelerator=accelerator, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def random_rollout(rows=6, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        mask[r, :int(torch.randint(1, length + 1, (1,), generator=g))] = 1  # completions of 1..length tokens
    logps = -torch.rand(rows, length, generator=g) * 3
    old = logps + torch.randn(rows, length, generator=g) * 0.3  # ratios on both sides of the clip range
    ref = logps + torch.randn(rows, length, generator=g) * 0.5
    advantages = torch.randn(rows, generator=g)
    return logps, mask, old, ref, advantages


def ours(logps, mask, old, ref, advantages, *, loss_type, beta, epsilon=0.2, epsilon_high=None,
         max_completion_length=8):
    keep = mask.bool()
    rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)[keep]
    losses, _ = grpo_token_losses(logps[keep], old[keep], ref[keep], advantages[rows], beta, epsilon,
                                  epsilon if epsilon_high is None else epsilon_high)
    total = aggregate(losses, rows, mask.shape[0], loss_type)
    return total / loss_units(loss_type, mask.shape[0], int(mask.sum()), max_completion_length)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta, epsilon_high", [(0.0, None), (0.04, None), (0.1, 0.28)])
def test_loss_and_gradient_match_trl(loss_type, beta, epsilon_high):
    pytest.importorskip("trl")
    logps, mask, old, ref, advantages = random_rollout()
    a, b = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    expected = trl_grpo(a, mask, advantages, old, ref, loss_type=loss_type, beta=beta, epsilon_high=epsilon_high)
    got = ours(b, mask, old, ref, advantages, loss_type=loss_type, beta=beta, epsilon_high=epsilon_high)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8)
    assert a.grad.abs().sum() > 0


def trl_advantages(rewards, group, scale_rewards):
    """TRL 1.16's sum_then_normalize advantages (grpo_trainer.py, _generate_and_score_completions), transcribed."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    return advantages / (std + 1e-4) if scale_rewards != "none" else advantages


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale_rewards):
    pytest.importorskip("trl")
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4, scale_rewards), trl_advantages(rewards, 4, scale_rewards))
    assert group_advantages(rewards, 4)[4:8].eq(0).all()  # a group that agrees teaches nothing


# -- rollouts ------------------------------------------------------------------------------------------------


def prompt_items(obj, n):
    examples = [normalise({"prompt": f"Question {i}: what now?", "answer": str(i)}, "prompt", f"p:{i + 1}")
                for i in range(n)]
    return obj.prepare(examples, max_length=64)


def test_rollout_samples_groups_and_weights_rewards(tokenizer):
    ensure_chat_template(tokenizer)
    model = make_tiny_model("llama", len(tokenizer))
    ctx = TrainContext(handle=attach(model, LoRAConfig(r=4)))
    seen = []

    def length(prompts, completions, answer):
        seen.append((prompts, answer))
        return [float(len(c)) for c in completions]

    obj = GRPO(tokenizer, {"reward_functions": [length, lambda p, c: [9.0] * len(c)],
                           "reward_weights": [1.0, 0.5],
                           "num_generations": 3, "max_new_tokens": 4, "num_iterations": 2})
    items = prompt_items(obj, 2)
    obj.setup(model, ctx)
    steps = obj.rollout_steps(model, obj.collate(items), ctx)
    assert len(steps) == obj.optimizer_steps_per_batch() == 2
    batch = steps[0][0]
    assert batch["input_ids"].shape[0] == 6 and batch["advantages"].shape == (6,)
    assert seen[0][0] == ["Question 0: what now?"] * 3 + ["Question 1: what now?"] * 3
    assert seen[0][1] == ["0"] * 3 + ["1"] * 3
    assert batch["rollout_stats"]["rewards/1"] == 9.0  # each source's mean reward is logged
    # The old (sampling) policy and the reference are the same model at the start: both log-prob grids agree.
    torch.testing.assert_close(batch["old_logps"], batch["ref_logps"])
    loss, metrics = obj.loss(model, batch, ctx)
    assert math.isfinite(loss.item()) and metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for _, p in ctx.handle.trainable_parameters() if "lora_A" in _)


def test_validation_names_the_problem(tokenizer):
    with pytest.raises(ValueError, match="needs a reward"):
        GRPO(tokenizer, {})
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2"):
        GRPO(tokenizer, {"reward_functions": ["math:fsum", "math:fsum"], "reward_weights": [1.0]})
    with pytest.raises(ValueError, match="num_generations"):
        GRPO(tokenizer, {"reward_functions": "math:fsum", "num_generations": 1})
    with pytest.raises(ValueError, match="loss_type"):
        GRPO(tokenizer, {"reward_functions": "math:fsum", "loss_type": "ppo"})
    assert get_objective("grpo") is GRPO


# -- end to end -----------------------------------------------------------------------------------------------

LETTERS = ("def letters(prompts, completions):\n"
           "    # Verifiable reward: the share of ASCII letters in the completion.\n"
           "    return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(1, len(c)) for c in completions]\n")


def test_trainer_runs_grpo_and_raises_the_reward(tiny_model_dir, tmp_path, single_thread):
    (tmp_path / "rewards.py").write_text(LETTERS)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}: what now?"} for i in range(8)])
    config = RunConfig(model=str(tiny_model_dir), method="full", objective="grpo", data=str(data),
                       objective_options={"reward_functions": f"{tmp_path / 'rewards.py'}:letters",
                                          "num_generations": 8, "max_new_tokens": 6, "num_iterations": 2,
                                          "beta": 0.04},
                       max_steps=40, batch_size=4, learning_rate=2e-3, warmup_steps=0, lr_scheduler="constant",
                       output=str(tmp_path / "run"), eval_generate=False, progress=False)
    tuneforge.train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 40 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    first, last = (sum(r["reward"] for r in part) / 10 for part in (steps[:10], steps[-10:]))
    assert last > first + 0.1, (first, last)
