"""The optimiser and the learning-rate schedule: AdamW without decay on biases and norms; warmup then constant,
linear or cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RunConfig


def lr_lambda(config: RunConfig, total_steps: int):
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def learning_rate(config: RunConfig) -> float:
    return config.learning_rate if config.learning_rate is not None else config.method_class.default_learning_rate


def build_optimizer(named: list[tuple[str, nn.Parameter]], config: RunConfig) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and 1-D tensors (standard practice; decaying a gain toward 0 hurts).
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate(config), betas=config.adam_betas)
