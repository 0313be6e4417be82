"""Batched generation with the KV cache: greedy by default, or sampled (temperature / top-k / top-p).

Our own loop rather than ``model.generate`` so that every method sees the same, simple calls: one forward over
the left-padded prompts, then one token per step with the cache. Prompts are sorted by length so a batch
holds similar lengths (less padding), and results come back in the caller's order.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..data.batching import left_pad
from ..data.formats import Message
from ..data.template import ensure_chat_template, prompt_ids
from ..methods.kv_cache import cache_kwarg, output_cache
from ..progress import progress


AnyRunning = Callable[[bool], bool]  # this process still generates -> some process of the run still does


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: the trainer evaluates a model that trains afterwards, and tensors created under
        # inference_mode (FSDP2's gathered-parameter buffers among them) can never be updated in place again.
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def stop_token_ids(tokenizer, model: nn.Module | None = None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(extra)
    return ids


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token per row from ``[batch, vocab]`` logits."""
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generate_batch(model: nn.Module, prompts: list[list[int]], pad_id: int, stops: set[int], max_new_tokens: int,
                    do_sample: bool, temperature: float, top_k: int, top_p: float,
                    generator: torch.Generator | None, any_running: AnyRunning | None = None) -> list[list[int]]:
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # The cache keyword and output field are `cache` from transformers 5.24, `past_key_values` before; the old names
    # still work there but warn on every call.
    cache_key = cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stop_tensor = torch.tensor(sorted(stops), device=device) if stops else None
    generated: list[torch.Tensor] = []
    next_pos = position_ids[:, -1:] + 1
    for step in range(max_new_tokens):
        token = sample_next(out.logits[:, -1, :], do_sample, temperature, top_k, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        generated.append(token)
        if stop_tensor is not None:
            finished |= torch.isin(token, stop_tensor)
        running = not bool(finished.all())
        if step == max_new_tokens - 1 or not (any_running(running) if any_running else running):
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)  # finished rows keep feeding pad
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    logits_to_keep=1, **{cache_key: cache})
        cache = output_cache(out)
        next_pos = next_pos + 1
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]
    return rows


def _cut_at_stop(row: list[int], stops: set[int], keep_stop: bool = False) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + 1] if keep_stop else row[:i]
    return row


def length_batches(order: list[int], lengths: list[int], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """``order`` (sorted by length, ascending; ``lengths`` in that order) cut into batches of at most ``max_rows``
    rows and, when given, ``max_tokens`` padded tokens (rows x the batch's longest). A function of the lengths
    alone: ranks that generate the same prompts batch them alike."""
    batches: list[list[int]] = []
    for i, length in zip(order, lengths):
        if batches and len(batches[-1]) < max_rows and (
                max_tokens is None or (len(batches[-1]) + 1) * length <= max_tokens):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def generate_ids(model: nn.Module, tokenizer, prompt_id_lists: Sequence[list[int]], *, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 batch_size: int = 8, seed: int | None = 0, keep_stop: bool = False,
                 any_running: AnyRunning | None = None, max_batch_tokens: int | None = None,
                 progress_desc: str | None = None) -> list[list[int]]:
    """Generate continuations of token-id prompts; returns the new token ids, in the prompts' order.

    Each row ends before its stop token, or with it when ``keep_stop`` (PPO credits the token that ended it).
    ``any_running(this process still generates)`` says whether any process of a distributed run does: under FSDP
    every decoding step is a forward with collective all-gathers, so all ranks step until the last one is done
    (a finished row feeds padding, as within one batch). ``max_batch_tokens`` caps rows x (longest prompt + new
    tokens) per batch, so long prompts come in smaller batches (the KV cache stays bounded). ``progress_desc``: show
    progress over the prompts under that name (``progress.py``).
    """
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompt_id_lists)), key=lambda i: len(prompt_id_lists[i]))
    results: list[list[int]] = [[] for _ in prompt_id_lists]
    with eval_mode(model), progress(progress_desc, len(order), "prompt") as bar:
        for chunk in length_batches(order, [len(prompt_id_lists[i]) + max_new_tokens for i in order], batch_size,
                                    max_batch_tokens):
            outs = _generate_batch(model, [list(prompt_id_lists[i]) for i in chunk], pad_id, stops, max_new_tokens,
                                   do_sample, temperature, top_k, top_p, generator, any_running)
            for i, row in zip(chunk, outs):
                results[i] = _cut_at_stop(row, stops, keep_stop)
            bar.update(len(chunk))
    return results


def generate(model: nn.Module, tokenizer, prompts: Sequence[list[Message] | str], *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             batch_size: int = 8, seed: int | None = 0, max_batch_tokens: int | None = None,
             progress_desc: str | None = None) -> list[str]:
    """Chat-templated generation: each prompt is a message list, or a string taken as one user message."""
    ensure_chat_template(tokenizer)
    id_lists = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        id_lists.append(prompt_ids(tokenizer, messages))
    outs = generate_ids(model, tokenizer, id_lists, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
                        max_batch_tokens=max_batch_tokens, progress_desc=progress_desc)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
