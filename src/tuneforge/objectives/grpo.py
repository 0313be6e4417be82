"""Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

PPO without a value head: each prompt gets ``num_generations`` (G) sampled completions, and a completion's
advantage is its reward relative to its group's, ``A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)``, the
same for all its tokens. Each prompt batch is one rollout, then ``num_iterations × num_mini_batches`` optimiser
steps on the per-token loss

    -min(ρ_t A, clip(ρ_t, 1-ε_low, 1+ε_high) A) + β · KL_t,    ρ_t = π(y_t) / π_old(y_t)

with KL_t = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator, ≥ 0) against the reference: the adapter
switched off, or a frozen copy for full fine-tuning. The formulas, option names and defaults follow TRL's
GRPOTrainer (trl 1.16), except ``beta``: TRL's default is 0 (no reference at all); here the paper's 0.04.

How the token losses become one number (``loss_type``, as TRL):

* ``grpo``    mean over each completion's tokens, then mean over completions (favours short right answers);
* ``bnpo``    mean over the tokens of each micro-batch, then mean over micro-batches;
* ``dr_grpo`` sum over tokens / (completions × max_new_tokens) (Liu et al. 2025, Dr. GRPO: no length bias);
* ``dapo``    sum over tokens / tokens of the whole optimiser step (Yu et al. 2025, DAPO; TRL's default).

Rewards come from Python functions (``module:function``, several, each with a weight) and/or a tuneforge reward
model; their weighted sum is the completion's reward (TRL's ``sum_then_normalize``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..data.batching import pad_batch, to_device
from ..data.formats import Example, examples_of_kind
from ..data.preference import PromptItem, prompts_within, tokenize_prompt
from ..data.template import IGNORE_INDEX, Tokenized
from .base import Objective, ObjectiveConfig, TrainContext, disable_dropout, register
from ..models.logprobs import supervised_positions, target_token_logps
from .rollouts import (
    RewardFunction,
    call_reward_function,
    load_reward_function,
    optimizer_steps,
    sample_completions,
)

log = logging.getLogger(__name__)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclasses.dataclass
class GRPOConfig(ObjectiveConfig):
    """Options of GRPO (names and meanings as in TRL's GRPOConfig)."""

    objective: ClassVar[str] = "grpo"

    reward_functions: str | RewardFunction | list[str | RewardFunction] | None = None
    """One or more ``module:function`` / ``path/file.py:function`` rewards, each called as
    ``f(prompts, completions, **record_fields) -> list[float]`` (a callable in Python)."""
    reward_model: str | None = None
    """Run directory of a tuneforge reward model (objective: reward) that scores completions, after the functions."""
    reward_model_base: str | None = None
    """Base model of ``reward_model``; default: the one named in its adapter_config.json."""
    reward_weights: list[float] | None = None
    """Weight of each reward source (functions in order, then the reward model); default: 1 each."""
    num_generations: int = 8
    """Completions sampled per prompt (G): the group whose mean is each completion's baseline."""
    max_new_tokens: int = 64
    """Longest completion sampled (TRL's max_completion_length; dr_grpo divides by it)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; 1.0 samples the policy itself, which the importance ratios assume."""
    top_k: int = 0
    """Sample only among the k likeliest tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables."""
    beta: float = 0.04
    """Weight of the per-token KL to the reference (the paper's 0.04; 0 skips the reference forward entirely)."""
    epsilon: float = 0.2
    """Lower clip ε_low: the ratio π/π_old may fall to 1-ε before a negative advantage stops pushing it."""
    epsilon_high: float | None = None
    """Upper clip ε_high (DAPO's clip-higher recommends 0.28); default: epsilon."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """How token losses are averaged: grpo (per completion, then over completions), bnpo (per micro-batch), dr_grpo
    (by completions × max_new_tokens) or dapo (by the tokens of the whole step)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std (group), the rollout's (batch), or not at all (none, as Dr. GRPO
    recommends: the std gives too easy or too hard prompts more weight)."""
    num_iterations: int = 1
    """Passes over each rollout (GRPO's μ); above 1 the ratio π/π_old moves away from 1 and clipping matters."""
    num_mini_batches: int = 1
    """Optimiser steps per pass over a rollout."""
    micro_batch_size: int | None = None
    """Completions per forward pass when optimising (gradients accumulate over a mini-batch); default: all."""
    mask_truncated_completions: bool = False
    """Completions cut at max_new_tokens get no loss (DAPO): their reward judges an unfinished answer."""
    disable_dropout: bool = True
    """Turn off dropout, so sampling-time and training-time log-probs agree (ratio 1 at the first step)."""

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool) or self.scale_rewards is None:  # TRL's True / False; YAML's none
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if isinstance(self.reward_functions, str) or callable(self.reward_functions):
            self.reward_functions = [self.reward_functions]
        sources = len(self.reward_functions or []) + (self.reward_model is not None)
        if sources == 0:
            raise ValueError("grpo needs a reward: reward_functions (module:function, one or a list) and/or "
                             "reward_model (a reward run directory)")
        if self.reward_weights is not None and len(self.reward_weights) != sources:
            raise ValueError(f"grpo reward_weights has {len(self.reward_weights)} entries for {sources} reward "
                             "source(s) (the functions in order, then the reward model)")
        if self.num_generations < 2:
            raise ValueError(f"grpo num_generations must be >= 2 (a group is its own baseline), "
                             f"got {self.num_generations}")
        if self.max_new_tokens < 1 or self.num_iterations < 1 or self.num_mini_batches < 1:
            raise ValueError("grpo max_new_tokens, num_iterations and num_mini_batches must be >= 1")
        if self.beta < 0 or not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError("grpo beta must be >= 0, epsilon in [0, 1) and epsilon_high >= 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"grpo scale_rewards must be group, batch or none, got {self.scale_rewards!r}")


# -- the math, as pure functions ----------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """Each reward minus its group's mean, divided by the group's (or the batch's) unbiased std + 1e-4 (TRL's);
    ``rewards`` holds the groups one after another."""
    grouped = rewards.view(-1, group_size)
    advantages = rewards - grouped.mean(1).repeat_interleave(group_size)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(1).repeat_interleave(group_size) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected group, batch or none")
    return advantages


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                      advantages: torch.Tensor, beta: float, epsilon_low: float, epsilon_high: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO losses over flat ``[tokens]`` tensors (``advantages``: each token's completion's), and
    per-token statistics (KL, clipping)."""
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    losses = -torch.min(ratio * advantages, clipped * advantages)  # PPO's pessimistic bound
    stats = {"clip_ratio/low": ((ratio < 1 - epsilon_low) & (advantages < 0)).float(),
             "clip_ratio/high": ((ratio > 1 + epsilon_high) & (advantages > 0)).float()}
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, non-negative estimate of KL(π || π_ref)
        losses = losses + beta * kl
        stats["kl"] = kl.detach()
    return losses, stats


def aggregate(token_losses: torch.Tensor, rows: torch.Tensor, num_rows: int, loss_type: str) -> torch.Tensor:
    """A micro-batch's loss **sum** for the trainer, which divides it by the step's units (``loss_units``):
    grpo sums per-completion token means; bnpo gives the micro-batch's token mean (one unit); dr_grpo and dapo
    sum over tokens. ``rows[i]`` is the completion of token i."""
    if loss_type == "grpo":
        per_row = torch.zeros(num_rows, dtype=token_losses.dtype, device=token_losses.device)
        counts = torch.zeros_like(per_row).index_add(0, rows, torch.ones_like(token_losses))
        return (per_row.index_add(0, rows, token_losses) / counts.clamp(min=1)).sum()
    if loss_type == "bnpo":
        return token_losses.sum() / max(token_losses.numel(), 1)
    return token_losses.sum()


def loss_units(loss_type: str, num_rows: int, num_tokens: int, max_new_tokens: int) -> int:
    """What the trainer divides a step's summed loss by (see ``aggregate``)."""
    return {"grpo": num_rows, "bnpo": 1, "dr_grpo": num_rows * max_new_tokens, "dapo": num_tokens}[loss_type]


# -- the objective --------------------------------------------------------------------------------------


@register
class GRPO(Objective):
    name = "grpo"
    kinds = ("prompt", "preference")  # a preference record contributes its prompt
    config_class = GRPOConfig
    needs_reference = True
    online = True

    def __init__(self, tokenizer, options: dict[str, Any] | None = None):
        super().__init__(tokenizer, options)
        self.rollouts = 0  # seeds each rollout's sampling; checkpointed
        self.reward_functions = [load_reward_function(f) for f in self.config.reward_functions or []]
        self.reward_model = None

    # -- data -----------------------------------------------------------------------------------------
    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[PromptItem]:
        examples = examples_of_kind(examples, self.kinds, "GRPO (it needs prompts)")
        items, report = prompts_within([tokenize_prompt(self.tokenizer, ex) for ex in examples], max_length,
                                       self.config.max_length_policy)
        log.info("%s: %s", split, report.message(max_length))
        self.length_report = report
        return items

    def collate(self, items: list[PromptItem]) -> dict[str, Any]:
        return {"items": items}  # prompts stay token lists: the rollout pads them itself

    def units(self, batch: dict[str, Any]) -> int:
        if "items" in batch:  # a prompt batch (evaluation): the loss is the negated mean greedy reward
            return len(batch["items"])
        # A step whose completions were all masked (truncated) has no token: 1, as TRL clamps its normaliser.
        tokens = max(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), 1)
        return loss_units(self.config.loss_type, batch["advantages"].shape[0], tokens, self.config.max_new_tokens)

    # -- set-up and state -------------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)
        if self.config.reward_model is not None and self.reward_model is None:
            from .reward import load_reward_model

            self.reward_model = load_reward_model(self.config.reward_model_base, self.config.reward_model,
                                                  device=str(next(model.parameters()).device))

    def training_state(self) -> dict[str, torch.Tensor]:
        return {"rollouts": torch.tensor(self.rollouts, dtype=torch.int64)}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if "rollouts" in state:
            self.rollouts = int(state["rollouts"])

    # -- rollout ----------------------------------------------------------------------------------------
    def sample(self, model: nn.Module, items: list[PromptItem], do_sample: bool = True,
               ctx: TrainContext | None = None) -> tuple[list[list[int]], list[bool]]:
        c = self.config
        return sample_completions(model, self.tokenizer, [i.input_ids for i in items], max_new_tokens=c.max_new_tokens,
                                  temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                  seed=c.seed * 1_000_003 + self.rollouts, do_sample=do_sample, ctx=ctx)

    def rewards(self, items: list[PromptItem], completions: list[list[int]]) -> torch.Tensor:
        """``[completions, sources]`` rewards: each function's, then the reward model's."""
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        columns = [call_reward_function(fn, [i.text for i in items], texts, [i.fields for i in items])
                   for fn in self.reward_functions]
        if self.reward_model is not None:
            columns.append(list(self.reward_model.score([i.messages for i in items], texts)))
        return torch.tensor(columns, dtype=torch.float32).T

    def weighted_reward(self, per_source: torch.Tensor) -> torch.Tensor:
        weights = self.config.reward_weights or [1.0] * per_source.shape[1]
        return per_source @ torch.tensor(weights, dtype=per_source.dtype)

    @torch.no_grad()
    def rollout(self, model: nn.Module, items: list[PromptItem], ctx: TrainContext
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Sample G completions per prompt, score them, and attach group advantages and the log-probs the loss
        compares against (the sampling policy's when it is optimised more than once, the reference's)."""
        c = self.config
        group = [item for item in items for _ in range(c.num_generations)]
        completions, stopped = self.sample(model, group, ctx=ctx)
        device = next(model.parameters()).device
        per_source = self.rewards(group, completions)
        rewards = self.weighted_reward(per_source)
        advantages = group_advantages(rewards, c.num_generations, c.scale_rewards)

        rows = []
        for item, ids, done in zip(group, completions, stopped):
            trained = ids if done or not c.mask_truncated_completions else [IGNORE_INDEX] * len(ids)
            rows.append(Tokenized(item.input_ids + ids, [IGNORE_INDEX] * len(item.input_ids) + trained, item.source))
        batch = pad_batch(rows, self.tokenizer.pad_token_id)
        batch = to_device(batch, device)
        batch["advantages"] = advantages.to(device)
        if c.num_iterations > 1 or c.num_mini_batches > 1:
            # The policy moves between optimiser steps on this rollout: keep the sampling policy's log-probs.
            # (With one step, π_old = π exactly and the loss uses the detached current log-probs, as TRL.)
            batch["old_logps"] = self.grid_logps(model, batch)
        if c.beta != 0.0:
            with ctx.reference() as reference:
                batch["ref_logps"] = self.grid_logps(reference, batch)

        grouped = rewards.view(-1, c.num_generations)
        stats = {"reward": rewards.mean().item(), "reward_std": grouped.std(1).mean().item(),
                 "frac_reward_zero_std": grouped.std(1).lt(1e-6).float().mean().item(),
                 "completion_length": sum(map(len, completions)) / len(completions),
                 "stopped": sum(stopped) / len(stopped)}
        if per_source.shape[1] > 1:
            stats.update({f"rewards/{i}": v for i, v in enumerate(per_source.mean(0).tolist())})
        self.rollouts += 1
        return batch, stats

    @staticmethod
    def grid_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[batch, time]`` log-probs of the sampled tokens (at the positions that predict them; 0 elsewhere)."""
        keep = supervised_positions(batch["labels"])
        out = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
        out[keep] = target_token_logps(model, batch)
        return out

    def optimizer_steps_per_batch(self) -> int:
        return self.config.num_iterations * self.config.num_mini_batches

    def rollout_steps(self, model: nn.Module, prompt_batch: dict[str, Any], ctx: TrainContext
                      ) -> list[list[dict[str, Any]]]:
        """Roll out once; ``num_iterations × num_mini_batches`` optimiser steps of micro-batches on it."""
        c = self.config
        rollout, stats = self.rollout(model, prompt_batch["items"], ctx)
        return optimizer_steps(rollout, c.num_iterations, c.num_mini_batches, c.micro_batch_size,
                               c.seed * 1_000_003 + self.rollouts, stats)

    # -- loss -------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        if "items" in batch:
            return self.evaluation_loss(model, batch["items"], ctx)
        c = self.config
        keep = supervised_positions(batch["labels"])
        logps = target_token_logps(model, batch)  # the projection fused with the loss for large batches
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
        old = batch["old_logps"][keep] if "old_logps" in batch else logps.detach()
        ref = batch["ref_logps"][keep] if "ref_logps" in batch else None
        token_losses, stats = grpo_token_losses(logps, old, ref, batch["advantages"][rows], c.beta, c.epsilon,
                                                c.epsilon if c.epsilon_high is None else c.epsilon_high)
        loss = aggregate(token_losses, rows, keep.shape[0], c.loss_type)
        units = self.units(batch)
        tokens = max(int(keep.sum()), 1)
        # Metrics travel as sums the trainer divides by the step's units: token means are scaled to units.
        metrics = {"loss": loss.detach(), **{k: v.sum() * units / tokens for k, v in stats.items()}}
        metrics.update({k: v * units for k, v in batch["rollout_stats"].items()})
        return loss, metrics

    @torch.no_grad()
    def evaluation_loss(self, model: nn.Module, items: list[PromptItem], ctx: TrainContext | None = None
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        """Held-out prompts: greedy completions' summed (weighted) reward, negated as a loss (lower is better)."""
        completions, _ = self.sample(model, items, do_sample=False, ctx=ctx)
        total = self.weighted_reward(self.rewards(items, completions)).sum().item()
        return torch.tensor(-total), {"loss": -total, "reward": total}
