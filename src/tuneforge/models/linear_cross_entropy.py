"""The output projection and the cross-entropy in one pass over chunks of tokens: the ``[tokens, vocab]`` float32
logits are never held whole.

A Llama-3-8B-vocabulary batch of 4 x 2048 tokens has 8192 x 128,256 logits: 4 GiB in float32, plus as much again
for their softmax and gradient, more than the whole LoRA state. Here each chunk of rows is projected, reduced and
dropped:

* ``linear_cross_entropy_sum`` (SFT, pretraining: one scalar loss) computes the gradients of the hidden states and
  of the projection inside the forward, chunk by chunk, as liger-kernel's fused linear cross-entropy does; backward
  only scales them by the incoming scalar. Nothing is computed twice.
* ``linear_token_logps`` (DPO, ORPO, SimPO, KTO, GRPO and PPO's reference: per-token log-probabilities with
  per-token upstream gradients) keeps the hidden states and the log-sum-exp per row and recomputes each chunk's
  logits in backward. PPO's policy forward keeps its logits: its entropy metric reads the whole distribution.

Both agree with ``F.cross_entropy(hidden @ weight.T + bias)`` to float rounding (tests/objectives/
test_linear_cross_entropy.py), in value and in every gradient.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 64 * 2**20  # float32 logits per chunk: small next to the model, large enough for fast GEMMs


def rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.T
    return (logits if bias is None else logits + bias).float()


def _grad_inputs(dlogits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                 needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (hidden chunk, weight, bias) from the chunk's float32 logit gradients."""
    d = dlogits.to(hidden.dtype)
    return (d @ weight if needs[0] else None, d.T @ hidden if needs[1] else None,
            dlogits.sum(0) if needs[2] else None)


class LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs[2] else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            logits = _logits(h, weight, bias)
            lse = logits.logsumexp(-1)
            rows = torch.arange(len(y), device=y.device)
            loss += (lse - logits[rows, y]).sum()
            if any(needs):
                dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                dlogits[rows, y] -= 1
                gh, gw, gb = _grad_inputs(dlogits, h, weight, needs)
                if needs[0]:
                    grad_hidden[start:start + chunk] = gh
                if needs[1]:
                    grad_weight += gw.float()
                if needs[2]:
                    grad_bias += gb
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        del ctx.grads
        scale = lambda g, dtype=None: None if g is None else (g * grad_loss).to(dtype or g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight, ctx.dtypes[0]), scale(grad_bias, ctx.dtypes[1]), None, None


class LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[start:start + chunk], weight, bias)
            y = targets[start:start + chunk]
            lse[start:start + chunk] = logits.logsumexp(-1)
            out[start:start + chunk] = logits[torch.arange(len(y), device=y.device), y] - lse[start:start + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, y, g = (t[start:start + ctx.chunk] for t in (hidden, targets, grad_out))
            # d logp(y) / d logits = onehot(y) - softmax, times the upstream gradient of each row.
            dlogits = _logits(h, weight, bias).sub_(lse[start:start + ctx.chunk, None]).exp_().mul_(-g[:, None])
            dlogits[torch.arange(len(y), device=y.device), y] += g
            gh, gw, gb = _grad_inputs(dlogits, h, weight, needs)
            if needs[0]:
                grad_hidden[start:start + ctx.chunk] = gh
            if needs[1]:
                grad_weight += gw.float()
            if needs[2]:
                grad_bias += gb
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")`` in float32, chunked."""
    if not torch.is_grad_enabled():  # evaluation: no gradients to compute on the way
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    return LinearCrossEntropySum.apply(hidden, weight, bias, targets, rows_per_chunk(weight.shape[0]))


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T + bias)[targets]`` per row, float32, chunked: ``[rows]``."""
    return LinearTokenLogps.apply(hidden, weight, bias, targets, rows_per_chunk(weight.shape[0]))
