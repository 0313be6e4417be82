"""One batch of generation rows, token by token, with per-row sampling, stop strings, streaming and cancellation.

The calls are those of ``tuneforge.inference.generate`` (one forward over the left-padded prompts with position ids
from the
mask, then one token per step with the KV cache), so a greedy row gives what ``generate`` gives for that prompt.
What a server needs on top: each row has its own length limit, temperature / top-k / top-p / seed and stop strings,
text goes out as it is decoded, and a row whose client has gone is dropped from further work.

Log-probabilities come from the forwards that generate: ``log_softmax`` in float32 of the logits that picked each
token (the model's own distribution, before temperature or top-k / top-p, as OpenAI and vLLM report them), and for a
row that asks for its prompt's, of the prefill forward's logits over the prompt. That forward runs with the row's
adapter (LoRA rows of one batch share it), so a prompt scored alone or beside other adapters' rows scores the same.
A prompt's logits cost ``[prompt length, vocab]`` per row, computed only for the rows that ask.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..data.batching import left_pad
from ..inference.generate import sample_next
from ..methods.kv_cache import cache_kwarg, output_cache


@dataclasses.dataclass
class TokenLogprob:
    """A token with its log-probability under the model and the ``top`` likeliest tokens at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Row:
    """One choice of one request."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    emit: Callable[[str], None] = lambda text: None
    """Receives each new piece of text (the pieces join to the final text)."""
    cancelled: Callable[[], bool] = lambda: False
    logprobs: int | None = None
    """Record each generated token's log-probability and this many likeliest alternatives (None: record nothing)."""
    prompt_logprobs: bool = False
    """Also record the prompt tokens' (all but the first, which nothing predicts) from the prefill forward."""
    completion_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_token_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def run_batch(model: nn.Module, tokenizer, rows: list[Row], stop_ids: set[int], pad_id: int) -> None:
    """Generate every row to its end; results are in each row (``text``, ``tokens``, ``finish_reason``)."""
    device = next(model.parameters()).device
    for row in rows:
        if row.temperature > 0 and row.seed is not None:
            row.generator = torch.Generator(device=device).manual_seed(row.seed)
    ids, mask = left_pad([r.prompt for r in rows], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_key = cache_kwarg(model)
    # The prefill keeps the logits of the longest prompt whose log-probs a row wants (left padding: the last
    # positions), else only the next token's.
    keep = max([len(r.prompt) for r in rows if r.prompt_logprobs], default=1)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=keep)
        for i, row in enumerate(rows):
            if row.prompt_logprobs:  # position t predicts prompt token t + 1
                logits = out.logits[i, keep - len(row.prompt):-1]
                row.prompt_token_logprobs = scored(logits, row.prompt[1:], row.logprobs or 0)
            if row.max_new_tokens == 0:  # scoring only (echo with max_tokens 0)
                row.finish_reason = "length"
        next_pos = position_ids[:, -1:] + 1
        while True:
            tokens = [pad_id] * len(rows)  # finished rows keep feeding pad
            for i, row in enumerate(rows):
                if row.done:
                    continue
                logits = out.logits[i:i + 1, -1, :]
                tokens[i] = _pick(logits, row)
                if _advance(row, tokens[i], tokenizer, stop_ids) and row.logprobs is not None:
                    row.completion_logprobs += scored(logits, [tokens[i]], row.logprobs)
            if all(r.done for r in rows):
                return
            token_tensor = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = model(input_ids=token_tensor, attention_mask=mask, position_ids=next_pos, use_cache=True,
                        logits_to_keep=1, **{cache_key: output_cache(out)})
            next_pos = next_pos + 1


def scored(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """Each target's log-probability under ``logits`` ``[len(targets), vocab]`` (log_softmax in float32) and the
    ``k`` likeliest tokens at its position."""
    if not targets:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
    if k:
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        top = [[] for _ in targets]
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(targets, chosen, top)]


def _pick(logits: torch.Tensor, row: Row) -> int:
    if row.temperature <= 0:
        return int(logits.argmax(-1))
    return int(sample_next(logits, True, row.temperature, row.top_k, row.top_p, row.generator))


def _advance(row: Row, token: int, tokenizer, stop_ids: set[int]) -> bool:
    """Take ``token`` into ``row``: detect its end (stop token, stop string, length, cancel) and emit new text. False
    when the row was cancelled instead (the token is not taken)."""
    if row.cancelled():
        row.finish_reason = "cancelled"
        return False
    row.tokens.append(token)
    if token in stop_ids:
        row.finish_reason = "stop"
    else:
        row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = _first_stop(row.text, row.stop)
        if cut is not None:
            row.text, row.finish_reason = row.text[:cut], "stop"
        elif len(row.tokens) >= row.max_new_tokens:
            row.finish_reason = "length"
    _emit(row)
    return True


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _emit(row: Row) -> None:
    """Send what is settled: not a trailing partial character, nor a tail that may still become a stop string."""
    end = len(row.text)
    if not row.done:
        if row.text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        end -= _stop_prefix_overlap(row.text, row.stop)
    if end > row.sent:
        row.emit(row.text[row.sent:end])
        row.sent = end


def _stop_prefix_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is the start of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


__all__ = ["Row", "TokenLogprob", "run_batch", "scored"]
