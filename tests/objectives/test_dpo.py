"""DPO: the loss equals TRL's (values and gradients), starts at log 2, trains through the trainer, and its
reference — the adapter disabled, precomputed, or a separate model — is the frozen starting policy."""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_model, write_jsonl
from tuneforge.config import RunConfig
from tuneforge.data.formats import DataError, normalise
from tuneforge.data.template import IGNORE_INDEX, ensure_chat_template, prompt_ids
from tuneforge.methods import attach
from tuneforge.methods.lora import LoRAConfig
from tuneforge.objectives import TrainContext, get_objective
from tuneforge.objectives.dpo import DPO, chosen_nll, dpo_loss
from tuneforge.run.trainer import Trainer, training_examples

# -- TRL oracle: DPOTrainer._compute_loss run on given per-token log-probs ---------------------------------


def trl_dpo(per_token_logps, completion_mask, ref_chosen, ref_rejected, loss_type, beta, label_smoothing=0.0,
            loss_weights=None):
    """TRL's own loss code, fed through a stand-in model whose output *is* the per-token log-probs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = per_token_logps.shape[0]
    zeros = torch.zeros_like(per_token_logps.detach())
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                              is_top1=zeros.bool())
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_type if isinstance(loss_type, list) else [loss_type], loss_weights=loss_weights or [1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, completion_mask.shape[1], dtype=torch.long),
              "attention_mask": torch.ones_like(completion_mask), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)


def random_pairs(pairs=4, length=6, seed=0):
    """Per-token log-probs [2B, length-1] (zero outside each response) and completion masks [2B, length]."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row in range(2 * pairs):
        completion_mask[row, int(torch.randint(1, length - 1, (1,), generator=g)):] = 1  # responses of 1..5 tokens
    token_logps = -torch.rand(2 * pairs, length - 1, generator=g) * 3 * completion_mask[:, 1:]
    ref = -torch.rand(2 * pairs, generator=g) * 8
    return token_logps, completion_mask, ref[:pairs], ref[pairs:]


def ours(token_logps, completion_mask, ref_chosen, ref_rejected, **kw):
    chosen, rejected = token_logps.sum(1).chunk(2)
    lengths = completion_mask.sum(1)
    losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths=lengths.chunk(2)[0],
                            rejected_lengths=lengths.chunk(2)[1], **kw)
    return losses.mean()  # TRL averages over pairs; tuneforge returns the sum and the trainer divides


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 1.0)])
def test_loss_and_gradient_match_trl(loss_type, beta):
    pytest.importorskip("trl")
    token_logps, mask, ref_c, ref_r = random_pairs()
    a, b = token_logps.clone().requires_grad_(), token_logps.clone().requires_grad_()
    expected = trl_dpo(a, mask, ref_c, ref_r, loss_type, beta)
    got = ours(b, mask, ref_c, ref_r, beta=beta, loss_type=loss_type)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8)
    assert a.grad.abs().sum() > 0


def test_rpo_matches_trl_sigmoid_plus_sft():
    """RPO: DPO plus rpo_alpha x the chosen responses' token-mean NLL, as TRL's loss_type ["sigmoid", "sft"]."""
    pytest.importorskip("trl")
    token_logps, mask, ref_c, ref_r = random_pairs(pairs=4, seed=2)
    a, b = token_logps.clone().requires_grad_(), token_logps.clone().requires_grad_()
    expected = trl_dpo(a, mask, ref_c, ref_r, ["sigmoid", "sft"], 0.1, loss_weights=[1.0, 0.7])
    chosen_lengths = mask.sum(1).chunk(2)[0]
    response_logps = (b * mask[:, 1:]).sum(1)  # as sequence_logps: response tokens only
    got = ours(b, mask, ref_c, ref_r, beta=0.1) + 0.7 * chosen_nll(response_logps.chunk(2)[0], chosen_lengths)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8)
    assert not torch.isclose(got, ours(token_logps, mask, ref_c, ref_r, beta=0.1))  # the term is really there


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_conservative_dpo_matches_trl(label_smoothing):
    """TRL 1.x keeps cDPO's smoothed logistic loss only inside its "aot" loss, which sorts log-ratios across
    the batch; for a single pair the sort is the identity and "aot" is exactly conservative DPO."""
    pytest.importorskip("trl")
    token_logps, mask, ref_c, ref_r = random_pairs(pairs=3, seed=1)
    for i in range(3):
        rows = [i, 3 + i]
        a, b = token_logps[rows].clone().requires_grad_(), token_logps[rows].clone().requires_grad_()
        expected = trl_dpo(a, mask[rows], ref_c[i:i + 1], ref_r[i:i + 1], "aot", 0.2, label_smoothing)
        got = ours(b, mask[rows], ref_c[i:i + 1], ref_r[i:i + 1], beta=0.2, label_smoothing=label_smoothing)
        expected.backward()
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8)
    # And smoothing changes the loss (it is not silently ignored).
    plain = ours(token_logps, mask, ref_c, ref_r, beta=0.2)
    assert not torch.isclose(plain, ours(token_logps, mask, ref_c, ref_r, beta=0.2, label_smoothing=0.3))


def test_pinned_values():
    # Δ = (−1 − −2) − (−3 − −2.5) = 1.5; β = 0.5 → −log σ(0.75); implicit rewards β·log-ratios.
    losses, rc, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                              torch.tensor([-2.5]), beta=0.5)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.75))))
    assert (rc.item(), rr.item()) == (pytest.approx(0.5), pytest.approx(-0.25))


# -- on tiny models ---------------------------------------------------------------------------------------

REJECTED = ["The quick brown fox jumps over the lazy dog.", "No."]
PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": REJECTED[(a + b) % 2]}
         for a in range(4) for b in range(3)]


@pytest.fixture
def chat_tokenizer(tokenizer):
    ensure_chat_template(tokenizer)
    return tokenizer


def examples(rows=PAIRS):
    return [normalise(r, "preference", f"pairs.jsonl:{i + 1}") for i, r in enumerate(rows)]


def test_pairs_share_the_prompt_and_only_responses_carry_labels(chat_tokenizer):
    item = DPO(chat_tokenizer).prepare(examples()[:1], 256)[0]
    p = prompt_ids(chat_tokenizer, [{"role": "user", "content": PAIRS[0]["prompt"]}])
    for side, text in ((item.chosen, PAIRS[0]["chosen"]), (item.rejected, PAIRS[0]["rejected"])):
        assert side.input_ids[:len(p)] == p
        assert side.labels[:len(p)] == [IGNORE_INDEX] * len(p)
        response = side.input_ids[len(p):]
        assert side.labels[len(p):] == response
        assert response[-1] == chat_tokenizer.eos_token_id  # the answer is closed: the model learns to stop
        assert chat_tokenizer.decode(response, skip_special_tokens=True) == text


def test_max_length_is_counted_not_silent(chat_tokenizer):
    full = DPO(chat_tokenizer).prepare(examples(), 256)
    longest = [max(len(i.chosen.input_ids), len(i.rejected.input_ids)) for i in full]
    limit = min(longest)  # the short-rejected pairs fit, the fox pairs do not
    assert max(longest) > limit
    obj = DPO(chat_tokenizer, {"max_length_policy": "drop"})
    kept = obj.prepare(examples(), limit)
    assert len(kept) == sum(n <= limit for n in longest) == len(PAIRS) - obj.length_report.dropped
    assert obj.length_report.too_long == obj.length_report.dropped > 0
    with pytest.raises(DataError, match=r"pairs.jsonl:1: \d+ tokens is longer than max_length"):
        DPO(chat_tokenizer, {"max_length_policy": "error"}).prepare(examples(), limit)
    truncated = DPO(chat_tokenizer, {"max_length_policy": "truncate"}).prepare(examples(), limit)
    assert len(truncated) == len(PAIRS)
    assert all(len(i.rejected.input_ids) <= limit and i.rejected.num_supervised > 0 for i in truncated)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("precompute", [False, True])
def test_step0_loss_is_log2_with_lora(chat_tokenizer, arch, precompute):
    model = make_tiny_model(arch, len(chat_tokenizer)).train()  # GPT-2 has dropout 0.1: DPO turns it off
    handle = attach(model, LoRAConfig(r=4, lora_dropout=0.1))
    obj = DPO(chat_tokenizer, {"precompute_ref_log_probs": precompute})
    items = obj.prepare(examples(), 256)
    ctx = TrainContext(handle=handle)
    obj.setup(model, ctx)
    batch = obj.collate(items)
    assert ("ref_chosen_logps" in batch) == precompute
    loss, metrics = obj.loss(model, batch, ctx)
    assert loss.item() / obj.units(batch) == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


def test_rpo_adds_the_chosen_nll_per_pair(chat_tokenizer):
    """At step 0 (policy = reference) the loss per pair is log 2 + rpo_alpha x the chosen token-mean NLL."""
    from tuneforge.models.logprobs import sequence_logps

    model = make_tiny_model("llama", len(chat_tokenizer))
    handle = attach(model, LoRAConfig(r=4))
    obj = DPO(chat_tokenizer, {"rpo_alpha": 0.5})
    batch = obj.collate(obj.prepare(examples(), 256))
    ctx = TrainContext(handle=handle)
    obj.setup(model, ctx)
    loss, metrics = obj.loss(model, batch, ctx)
    pairs = obj.units(batch)
    with torch.no_grad():
        chosen = sequence_logps(model, batch).chunk(2)[0]
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).chunk(2)[0].sum()
    nll = (-chosen.sum() / tokens).item()
    assert nll > 0.5 and metrics["nll/chosen"] / pairs == pytest.approx(nll, rel=1e-5)
    assert loss.item() / pairs == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5)


def test_full_finetuning_uses_the_separate_reference(chat_tokenizer):
    model = make_tiny_model("llama", len(chat_tokenizer))
    reference = copy.deepcopy(model).requires_grad_(False)
    ctx = TrainContext(reference_model=reference)
    obj = DPO(chat_tokenizer, {"beta": 0.5})
    batch = obj.collate(obj.prepare(examples(), 256))
    obj.setup(model, ctx)
    assert obj.loss(model, batch, ctx)[0].item() / obj.units(batch) == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # the policy moves; the reference must not
    assert obj.loss(model, batch, ctx)[0].item() / obj.units(batch) != pytest.approx(math.log(2), abs=1e-3)


def test_trainer_reduces_loss_and_keeps_base_bit_identical(chat_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    model = make_tiny_model("gpt2", len(chat_tokenizer))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = RunConfig(model="tiny", method="lora", method_options={"r": 8}, objective="dpo",
                       objective_options={"beta": 0.5, "precompute_ref_log_probs": True}, data=str(data),
                       max_steps=8, batch_size=6, micro_batch_size=3, learning_rate=2e-2, warmup_steps=0,
                       lr_scheduler="constant", output=str(tmp_path / "run"), eval_generate=False, progress=False)
    trainer = Trainer(config, model, chat_tokenizer)
    trainer.prepare_data(*training_examples(config))
    result = trainer.train()
    assert all(i.ref_logps is not None for i in trainer.objective.prepared)  # precomputed once, in setup()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < 0.5 * losses[0]
    assert result.metrics["rewards/accuracies"] == 1.0
    lora_free = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for k, v in base.items():
        key = k if k in lora_free else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(lora_free[key], v), k


def test_precomputed_reference_equals_on_the_fly_after_training(chat_tokenizer):
    model = make_tiny_model("llama", len(chat_tokenizer))
    handle = attach(model, LoRAConfig(r=4))
    ctx = TrainContext(handle=handle)
    pre = DPO(chat_tokenizer, {"precompute_ref_log_probs": True})
    items = pre.prepare(examples(), 256)
    pre.setup(model, ctx)  # before any training: the reference is the base model
    with torch.no_grad():
        for _, p in handle.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    live = DPO(chat_tokenizer)
    batch_pre, batch_live = pre.collate(items), live.collate(live.prepare(examples(), 256))
    loss_pre, loss_live = pre.loss(model, batch_pre, ctx)[0], live.loss(model, batch_live, ctx)[0]
    assert loss_pre.item() != pytest.approx(math.log(2) * len(items), abs=1e-3)  # the policy really moved
    torch.testing.assert_close(loss_pre, loss_live, rtol=1e-5, atol=1e-5)


def test_registered_and_options_validated(chat_tokenizer):
    assert get_objective("dpo") is DPO and get_objective("Direct-Preference-Optimization") is DPO
    with pytest.raises(ValueError, match="unknown option.*betta"):
        DPO(chat_tokenizer, {"betta": 0.1})
    with pytest.raises(ValueError, match="sigmoid loss only"):
        DPO(chat_tokenizer, {"loss_type": "ipo", "label_smoothing": 0.1})
    with pytest.raises(ValueError, match="loss_type"):
        DPO(chat_tokenizer, {"loss_type": "hinge"})
    with pytest.raises(ValueError, match="rpo_alpha"):
        DPO(chat_tokenizer, {"rpo_alpha": -1})
    with pytest.raises(DataError, match="cannot be used for DPO"):
        DPO(chat_tokenizer).prepare([normalise({"instruction": "a", "output": "b"}, "alpaca", "f.jsonl:3")], 64)
