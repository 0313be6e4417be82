"""PPO: GAE, the clipped losses and the KL controller against hand-computed values; rollouts (EOS credit, the
disabled adapter as reference, reward functions and reward models); and a run through the trainer that raises a
verifiable reward while the KL to the reference stays bounded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_model, write_jsonl
from tuneforge.config import RunConfig
from tuneforge.data.formats import normalise
from tuneforge.data.template import ensure_chat_template
from tuneforge.inference.generate import generate_ids
from tuneforge.methods import attach
from tuneforge.methods.lora import LoRAConfig
from tuneforge.objectives import TrainContext, get_objective
from tuneforge.objectives import rollouts as rollouts_module
from tuneforge.objectives.ppo import (PPO, adaptive_kl_coef, call_reward_function, gae, load_reward_function,
                                      masked_whiten, ppo_loss)
from tuneforge.objectives.reward import RewardHead, load_reward_model, save_reward_head
from tuneforge.run.trainer import Trainer, training_examples

# -- the math -----------------------------------------------------------------------------------------------


def test_gae_matches_a_hand_computed_example():
    # Row 0: three actions. Row 1: a prompt position first and padding last, which must not leak in.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [5.0, 0.0, 2.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0], [9.0, 0.3, 0.1, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # δ_t = r_t + γV_{t+1} − V_t ; A_t = δ_t + γλA_{t+1} (γλ = 0.72), with V = 0 after the last action.
    a2 = 1.0 - 0.4
    a1 = (0.9 * 0.4 - 0.2) + 0.72 * a2
    a0 = (0.9 * 0.2 - 0.5) + 0.72 * a1
    b2 = 2.0 - 0.1
    b1 = (0.9 * 0.1 - 0.3) + 0.72 * b2
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2, 0.0], [0.0, b1, b2, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0], [0.0, b1 + 0.3, 2.0, 0.0]]))


def test_whitening_uses_only_the_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = masked_whiten(x, mask)
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / torch.tensor([1.0, 2.0, 3.0, 4.0]).std()
    torch.testing.assert_close(w[mask.bool()], expected, rtol=1e-5, atol=1e-6)
    assert w[:, 2].eq(0).all()


def test_clipped_losses_pinned():
    logps = torch.log(torch.tensor([1.5, 1.5, 0.5])).requires_grad_()  # ratios 1.5, 1.5, 0.5 against old = 0
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 1.0])
    values = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    old_values, returns = torch.tensor([0.0, 0.0, 0.5]), torch.tensor([2.0, 0.0, 0.5])
    loss, stats = ppo_loss(logps, old, adv, values, old_values, returns, cliprange=0.2, cliprange_value=0.2,
                           vf_coef=0.1)
    # Token 0: A > 0 and ratio 1.5 > 1.2 → clipped at −1.2, no gradient. Token 1: A < 0 → −A·1.5 = 1.5 (the
    # unclipped term is the larger one). Token 2: A > 0, ratio 0.5 → −0.5 (clipping would give −0.8).
    torch.testing.assert_close(stats["policy_loss"], torch.tensor([-1.2, 1.5, -0.5]))
    assert stats["clipfrac"].tolist() == [1.0, 0.0, 0.0]
    # Value 0 moved 1.0 from 0.0, clipped to 0.2: max((1−2)², (0.2−2)²)/2 = 1.62.
    torch.testing.assert_close(stats["value_loss"], torch.tensor([1.62, 0.0, 0.0]))
    loss.sum().backward()
    assert logps.grad[0] == 0 and logps.grad[1] != 0 and values.grad[0] == 0  # clipped terms pass no gradient


def test_adaptive_kl_controller_is_ziegler_s():
    assert adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, kl=3.0, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, kl=6.6, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))


# -- reward sources -------------------------------------------------------------------------------------------


def test_reward_function_by_path_gets_record_columns(tmp_path):
    (tmp_path / "rewards.py").write_text(
        "def exact(prompts, completions, answer):\n"
        "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n"
        "def broken(prompts, completions):\n"
        "    return [float('nan')] * len(completions)\n")
    exact = load_reward_function(f"{tmp_path / 'rewards.py'}:exact")
    fields = [{"prompt": "2+3?", "answer": "5", "topic": "math"}, {"prompt": "2+2?", "answer": "4", "topic": "math"}]
    # Only the columns the function names are passed (it has no **kwargs, so "topic" stays out).
    assert call_reward_function(exact, ["2+3?", "2+2?"], [" 5", "5"], fields) == [1.0, 0.0]
    with pytest.raises(ValueError, match="broken returned nan"):
        call_reward_function(load_reward_function(f"{tmp_path / 'rewards.py'}:broken"), ["a"], ["b"], [{}])
    with pytest.raises(ValueError, match="no function 'missing'"):
        load_reward_function(f"{tmp_path / 'rewards.py'}:missing")
    with pytest.raises(ValueError, match="module:function"):
        load_reward_function("no_colon_here")
    assert load_reward_function("math:fsum")([1.0, 2.0]) == 3.0  # an importable module works too


def prompt_items(obj, n=8):
    rows = [{"prompt": f"Question {i}: what now?", "answer": str(i)} for i in range(n)]
    return obj.prepare([normalise(r, "prompt", f"prompts.jsonl:{i + 1}") for i, r in enumerate(rows)], 128)


def test_stopped_completions_keep_their_eos_and_unfinished_ones_pay(tokenizer, monkeypatch):
    ensure_chat_template(tokenizer)
    model = make_tiny_model("llama", len(tokenizer))
    ctx = TrainContext(handle=attach(model, LoRAConfig(r=4)))
    seen = []

    def reward(prompts, completions, answer):
        seen.append((prompts, completions, answer))
        return [1.0] * len(completions)

    obj = PPO(tokenizer, {"reward_function": reward, "max_new_tokens": 3, "missing_eos_penalty": 0.5})
    items = prompt_items(obj, 2)
    obj.setup(model, ctx)
    eos = tokenizer.eos_token_id
    # generate_ids(keep_stop=True): the first completion ended with its stop token, the second hit the budget.
    monkeypatch.setattr(rollouts_module, "generate_ids", lambda *a, **k: [[40, 41, eos], [40, 41, 42]])
    rollout, stats = obj.rollout(model, items, ctx)
    labels = [[t for t in row if t != -100] for row in rollout["labels"].tolist()]
    assert labels == [[40, 41, eos], [40, 41, 42]]  # the first stopped on its own: its EOS is an action
    assert stats["stopped"] == 0.5 and stats["reward"] == pytest.approx((1.0 + 0.5) / 2)
    assert seen[0][0] == ["Question 0: what now?", "Question 1: what now?"] and seen[0][2] == ["0", "1"]
    # The score sits on each completion's last action; everything else is the KL penalty (0 at the start).
    assert rollout["advantages"].shape == rollout["input_ids"].shape


def test_reward_model_scores_the_rollouts(tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ensure_chat_template(tokenizer)
    rm_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rm_handle = attach(rm_model, LoRAConfig(r=4, init_lora_weights=False))
    rm_handle.save(tmp_path / "rm", base_model_name_or_path=str(tiny_model_dir))
    torch.manual_seed(1)
    save_reward_head(RewardHead(32), tmp_path / "rm", tokenizer.chat_template)

    model = make_tiny_model("llama", len(tokenizer))
    ctx = TrainContext(handle=attach(model, LoRAConfig(r=4)))
    obj = PPO(tokenizer, {"reward_model": str(tmp_path / "rm"), "max_new_tokens": 5})
    items = prompt_items(obj, 4)
    obj.setup(model, ctx)
    completions, stopped = obj.sample(model, items)
    scores = obj.score(items, completions, stopped)
    rm = load_reward_model(None, tmp_path / "rm", device="cpu")
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    expected = rm.score([i.messages for i in items], texts)
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)
    assert len(set(round(s, 4) for s in expected)) > 1  # a real, input-dependent score


# -- the objective on a LoRA policy ---------------------------------------------------------------------------


def test_lora_policy_starts_at_the_reference_and_only_the_adapter_moves(tokenizer):
    ensure_chat_template(tokenizer)
    model = make_tiny_model("gpt2", len(tokenizer)).train()
    handle = attach(model, LoRAConfig(r=4))
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    ctx = TrainContext(handle=handle)
    obj = get_objective("ppo")(tokenizer, {"reward_function": lambda p, c: [c.count("e") / 8.0 for c in c],
                                           "max_new_tokens": 6, "num_ppo_epochs": 2, "num_mini_batches": 2})
    items = prompt_items(obj)
    obj.setup(model, ctx)  # also turns GPT-2's dropout off, so rollout and update log-probs agree
    params = [p for _, p in handle.trainable_parameters()] + [p for _, p in obj.extra_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    steps = obj.rollout_steps(model, obj.collate(items), ctx)
    assert len(steps) == 2 * 2 and all(len(s) == 1 for s in steps)
    assert steps[0][0]["rollout_stats"]["kl"] == 0.0  # LoRA starts at the base: policy == reference exactly
    for i, group in enumerate(steps):
        mb = group[0]
        units = obj.units(mb)
        loss, metrics = obj.loss(model, mb, ctx)
        if i == 0:  # nothing has moved yet: every ratio is 1, nothing is clipped
            assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-10) and metrics["clipfrac"] == 0.0
            assert metrics["kl_coef"] / units == pytest.approx(0.05)  # rollout stats come back per unit
        (loss / units).backward()
        opt.step()
        opt.zero_grad()
    after = obj.rollout(model, items, ctx)[1]
    assert after["kl"] != 0.0  # the adapter moved the policy; the disabled adapter (reference) did not
    for k, v in model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k
    assert obj.value_head.summary.weight.abs().sum() > 0  # the value head trained from its zero init


def test_evaluation_batches_report_the_greedy_reward(tokenizer):
    ensure_chat_template(tokenizer)
    model = make_tiny_model("llama", len(tokenizer))
    ctx = TrainContext(handle=attach(model, LoRAConfig(r=4)))
    obj = PPO(tokenizer, {"reward_function": lambda p, c: [float(len(x)) for x in c], "max_new_tokens": 4})
    items = prompt_items(obj, 3)
    obj.setup(model, ctx)
    batch = obj.collate(items)
    loss, metrics = obj.loss(model, batch, ctx)
    greedy = generate_ids(model, tokenizer, [i.input_ids for i in items], max_new_tokens=4)
    total = sum(len(tokenizer.decode(g + ([tokenizer.eos_token_id] if len(g) < 4 else []), skip_special_tokens=True))
                for g in greedy)
    assert obj.units(batch) == 3 and metrics["reward"] == pytest.approx(total) and loss.item() == pytest.approx(-total)


def test_state_for_checkpoints_and_validation(tokenizer):
    obj = PPO(tokenizer, {"reward_function": "math:fsum", "adaptive_kl": True, "kl_coef": 0.2})
    obj.kl_coef, obj.rollouts = 0.37, 5
    fresh = PPO(tokenizer, {"reward_function": "math:fsum", "adaptive_kl": True, "kl_coef": 0.2})
    fresh.load_training_state(obj.training_state())
    assert (fresh.kl_coef, fresh.rollouts) == (pytest.approx(0.37), 5)
    with pytest.raises(ValueError, match="exactly one reward source"):
        PPO(tokenizer, {})
    with pytest.raises(ValueError, match="exactly one reward source"):
        PPO(tokenizer, {"reward_function": "math:fsum", "reward_model": "runs/rm"})
    with pytest.raises(ValueError, match="unknown option.*ppo_epochs"):
        PPO(tokenizer, {"reward_function": "math:fsum", "ppo_epochs": 2})
    assert get_objective("rlhf") is PPO


# -- end to end -----------------------------------------------------------------------------------------------

LETTERS = ("def letters(prompts, completions):\n"
           "    # Verifiable reward: the share of ASCII letters in the completion.\n"
           "    return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(1, len(c)) for c in completions]\n")


def expected_reward(model, tokenizer, items, fn) -> float:
    outs = generate_ids(model, tokenizer, [i.input_ids for i in items] * 8, max_new_tokens=8, do_sample=True,
                        batch_size=128, seed=1234)
    return sum(fn(None, [tokenizer.decode(o, skip_special_tokens=True) for o in outs])) / len(outs)


def test_trainer_raises_a_verifiable_reward_with_bounded_kl(tiny_model_dir, tmp_path):
    (tmp_path / "rewards.py").write_text(LETTERS)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}: what now?"} for i in range(16)])
    # Full fine-tuning: a random tiny model's output layer is what can move its near-uniform policy; the
    # trainer loads the separate frozen reference from the same directory.
    config = RunConfig(model=str(tiny_model_dir), method="full", objective="ppo", data=str(data),
                       objective_options={"reward_function": f"{tmp_path / 'rewards.py'}:letters",
                                          "max_new_tokens": 8, "num_ppo_epochs": 2, "num_mini_batches": 2},
                       max_steps=160, batch_size=16, learning_rate=1e-3, warmup_steps=0, lr_scheduler="constant",
                       output=str(tmp_path / "run"), eval_generate=False, progress=False)
    trainer = Trainer(config)
    trainer.prepare_data(*training_examples(config))
    trainer.objective.setup(trainer.model, trainer.ctx)  # sizes the value head before the optimiser exists
    fn = trainer.objective.reward_function
    before = expected_reward(trainer.model, trainer.tokenizer, trainer.train_items, fn)
    trainer.train()
    after = expected_reward(trainer.model, trainer.tokenizer, trainer.train_items, fn)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "kl" in r]
    assert len(steps) == 160 and all(math.isfinite(r["loss"]) for r in steps)
    assert after > before + 0.1, (before, after)
    assert max(r["kl"] for r in steps[-20:]) < 5.0  # nats per completion of 8 tokens
    assert steps[0]["kl"] == 0.0  # the policy starts as the reference
