"""What the online objectives (PPO, GRPO) share: reward functions, sampling completions, and cutting a rollout into
the micro-batches of several optimiser steps.

A reward function is ``module:function`` (an importable module) or ``path/to/file.py:function``, called as
``f(prompts, completions, **record_fields) -> list[float]``, so a verifiable reward can read each record's
``answer`` column.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..inference.generate import generate_ids, stop_token_ids
from .base import TrainContext

RewardFunction = Callable[..., list[float]]


def load_reward_function(spec: str | RewardFunction) -> RewardFunction:
    """``module:function`` (importable module) or ``path/file.py:function``; a callable is returned as is."""
    if callable(spec):
        return spec
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward_function {spec!r} must look like module:function or path/file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward_function file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward_function {spec!r}: {module_name} has no function {attr!r}")
    return fn


def call_reward_function(fn: RewardFunction, prompts: list[str], completions: list[str],
                         fields: list[dict[str, Any]]) -> list[float]:
    """Call ``fn(prompts, completions, **columns)``; record columns go to the parameters it names (or **kwargs),
    so a verifiable reward can read e.g. each record's ``answer``."""
    params = inspect.signature(fn).parameters
    any_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = sorted({k for f in fields for k in f} - {"prompt", "messages", "prompts", "completions"})
    kwargs = {k: [f.get(k) for f in fields] for k in names if any_kwargs or k in params}
    scores = list(fn(prompts, completions, **kwargs))
    name = getattr(fn, "__name__", repr(fn))
    if len(scores) != len(completions):
        raise ValueError(f"reward function {name} returned {len(scores)} scores for {len(completions)} completions")
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"reward function {name} returned {s!r}; expected finite numbers")
    return [float(s) for s in scores]


def sample_completions(model: nn.Module, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int,
                       temperature: float, top_p: float, top_k: int, seed: int, do_sample: bool = True,
                       ctx: TrainContext | None = None) -> tuple[list[list[int]], list[bool]]:
    """Completions (closed by the stop token when the policy stopped) and whether each stopped on its own.

    The stop token is an action the policy took (and must be credited for), so it stays in the completion. In a
    distributed run (``ctx``) every rank decodes until all are done, so sharded forwards stay paired."""
    out = generate_ids(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       temperature=temperature, top_p=top_p, top_k=top_k, batch_size=len(prompt_ids), seed=seed,
                       keep_stop=True, any_running=ctx.any_rank if ctx is not None else None)
    stops = stop_token_ids(tokenizer, model)
    return out, [bool(ids) and ids[-1] in stops for ids in out]


def optimizer_steps(rollout: dict[str, torch.Tensor], epochs: int, num_mini_batches: int,
                    micro_batch_size: int | None, seed: int, stats: dict[str, float]) -> list[list[dict[str, Any]]]:
    """``epochs`` shuffled passes over a rollout's rows, each cut into ``num_mini_batches`` optimiser steps of
    micro-batches of ``micro_batch_size`` rows (default: the whole mini-batch). Every micro-batch carries the
    rollout's ``stats`` (logged once per step)."""
    n = rollout["input_ids"].shape[0]
    mini = math.ceil(n / num_mini_batches)
    micro = micro_batch_size or mini
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, mini):
            rows = order[start:start + mini]
            steps.append([rollout_rows(rollout, rows[i:i + micro], stats) for i in range(0, len(rows), micro)])
    return steps


def rollout_rows(rollout: dict[str, torch.Tensor], rows: torch.Tensor, stats: dict[str, float]) -> dict[str, Any]:
    """The rollout's ``rows``, trimmed to their longest sequence (right padding), with the rollout's stats."""
    rows = rows.to(rollout["input_ids"].device)
    width = int(rollout["attention_mask"][rows].sum(-1).max())
    mb: dict[str, Any] = {k: v[rows, :width] if v.dim() > 1 else v[rows] for k, v in rollout.items()}
    mb["rollout_stats"] = stats
    return mb
