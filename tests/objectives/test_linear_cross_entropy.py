"""The fused projection + cross-entropy (objectives/linear_cross_entropy.py) against the plain path: the same loss,
per-token log-probabilities and gradients (hidden states, projection weight, bias); and SFT / DPO losses through a
real model take the fused path for large batches with the plain path's numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model, qa_rows
from tuneforge.data.formats import normalise
from tuneforge.data.template import ensure_chat_template
from tuneforge.models import logprobs
from tuneforge.objectives import TrainContext, get_objective
from tuneforge.models.linear_cross_entropy import (
    LinearCrossEntropySum,
    LinearTokenLogps,
    linear_cross_entropy_sum,
    linear_token_logps,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def inputs(bias: bool):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, 50, (37,), generator=g)
    return hidden, weight, b, targets


def plain_logits(hidden, weight, bias):
    return hidden @ weight.T + (bias if bias is not None else 0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 100])  # one row at a time, uneven chunks, everything in one chunk
def test_the_fused_sum_has_the_plain_loss_and_gradients(bias, chunk):
    hidden, weight, b, targets = inputs(bias)
    params = [hidden, weight] + ([b] if bias else [])
    want = F.cross_entropy(plain_logits(hidden, weight, b), targets, reduction="sum") * 0.5
    want_grads = torch.autograd.grad(want, params)
    got = LinearCrossEntropySum.apply(hidden, weight, b, targets, chunk) * 0.5  # an upstream scale reaches them
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 100])
def test_fused_token_logps_have_the_plain_values_and_gradients(bias, chunk):
    hidden, weight, b, targets = inputs(bias)
    params = [hidden, weight] + ([b] if bias else [])
    upstream = torch.randn(37, dtype=torch.float64)  # per-token weights, as DPO's per-sequence sums give
    want = F.log_softmax(plain_logits(hidden, weight, b), -1).gather(1, targets[:, None]).squeeze(1)
    want_grads = torch.autograd.grad((want * upstream).sum(), params)
    got = LinearTokenLogps.apply(hidden, weight, b, targets, chunk)
    got_grads = torch.autograd.grad((got.double() * upstream).sum(), params)
    # The logits are float32 (as the plain path's cross-entropy): float32 rounding, whatever the thread count.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_without_gradients_nothing_is_computed_for_backward():
    hidden, weight, _, targets = inputs(False)
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, None, targets)
    assert not loss.requires_grad
    assert linear_token_logps(hidden, weight, None, targets).requires_grad


@pytest.fixture
def fused_always(monkeypatch):
    monkeypatch.setattr(logprobs, "FUSE_FROM_LOGITS", 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_the_final_hidden_states_are_what_the_head_projects(arch, tokenizer):
    model = make_tiny_model(arch, len(tokenizer))
    ids = torch.randint(5, len(tokenizer), (2, 9))
    labels = ids.clone()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        hidden, targets = logprobs.target_hidden(model, batch)
        logits, plain_targets = logprobs.target_logits(model, batch)
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, plain_targets)


@pytest.mark.parametrize("objective_name", ["sft", "dpo"])
def test_objective_losses_and_gradients_through_the_fused_path(objective_name, tokenizer, monkeypatch):
    tok = copy.deepcopy(tokenizer)
    ensure_chat_template(tok)
    objective = get_objective(objective_name)(tok)
    if objective_name == "sft":
        rows = [normalise(r, "alpaca", f"qa:{i}") for i, r in enumerate(qa_rows(4))]
    else:
        rows = [normalise({"prompt": f"Q{i}?", "chosen": "yes " * (i + 1), "rejected": "no"}, "preference",
                          f"p:{i}") for i in range(3)]
    batch = objective.collate(objective.prepare(rows, 64))
    model = make_tiny_model("qwen2", len(tok))  # an output head with bias-free tied weights off, and biases inside
    model.lm_head.weight.requires_grad_(True)  # full fine-tuning: the projection's gradient too
    reference = copy.deepcopy(model).requires_grad_(False)
    ctx = TrainContext(reference_model=reference)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss, _ = objective.loss(model, batch, ctx)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = loss_and_grads()
    monkeypatch.setattr(logprobs, "FUSE_FROM_LOGITS", 0)
    assert logprobs.fusable_head(model, batch["labels"]) is model.lm_head
    got, got_grads = loss_and_grads()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and "lm_head.weight" in got_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_models_that_transform_their_logits_keep_their_own_forward(tokenizer, fused_always):
    model = make_tiny_model("llama", len(tokenizer))
    labels = torch.zeros(1, 4, dtype=torch.long)
    assert logprobs.fusable_head(model, labels) is model.lm_head
    model.config.final_logit_softcapping = 30.0  # Gemma 2: tanh-capped logits
    assert logprobs.fusable_head(model, labels) is None
