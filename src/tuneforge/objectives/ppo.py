"""RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022).

Each prompt batch is one rollout, then several optimiser steps on it:

1. **Rollout.** Sample a completion per prompt from the policy (tuneforge's KV-cache generation), score it with
   a reward model or a Python function (verifiable rewards), and compute with no gradient the policy's and the
   reference's (adapter disabled) log-probs of the sampled tokens and the value head's estimates.
2. **Rewards.** Per token ``-kl_coef · (log π - log π_ref)`` (a KL penalty that keeps the policy near the
   reference), plus the score on the completion's last token. ``kl_coef`` is fixed or follows Ziegler et al.'s
   adaptive controller towards ``target_kl``.
3. **Advantages.** GAE(γ, λ) (Schulman et al. 2016) over the completion tokens, whitened across the rollout.
4. **Optimisation.** ``num_ppo_epochs`` passes over the rollout in ``num_mini_batches`` shuffled mini-batches,
   one optimiser step each, on the clipped policy loss plus ``vf_coef`` × the clipped value loss.

The value head is a ``Linear(hidden, 1)`` on the policy's final hidden states (a shared backbone, as TRL's
``AutoModelForCausalLMWithValueHead``); the trainer optimises it with the method's parameters. The trainer
hands each batch of prompts to :meth:`PPO.rollout_steps` (an online objective) and runs each returned list of
micro-batches as one optimiser step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.batching import pad_batch, to_device
from ..data.formats import Example, examples_of_kind
from ..data.preference import PromptItem, prompts_within, tokenize_prompt
from ..data.template import IGNORE_INDEX, Tokenized
from .base import Objective, ObjectiveConfig, TrainContext, disable_dropout, register
from ..models.logprobs import action_outputs, target_token_logps, token_logps
from .rollouts import (  # noqa: F401  (load_reward_function / call_reward_function: importable from here too)
    RewardFunction,
    call_reward_function,
    load_reward_function,
    optimizer_steps,
    sample_completions,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PPOConfig(ObjectiveConfig):
    """Options of PPO (names as in TRL's PPOConfig where it has them)."""

    objective: ClassVar[str] = "ppo"

    reward_model: str | None = None
    """Run directory of a tuneforge reward model (objective: reward) that scores completions."""
    reward_model_base: str | None = None
    """Base model of ``reward_model``; default: the one named in its adapter_config.json."""
    reward_function: str | RewardFunction | None = None
    """Instead of a reward model, ``module:function`` or ``path/to/file.py:function`` called as
    ``f(prompts, completions, **record_fields) -> list[float]`` (verifiable rewards); a callable in Python."""
    max_new_tokens: int = 64
    """Longest completion sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; 1.0 samples the policy itself, which PPO's ratios assume."""
    top_k: int = 0
    """Sample only among the k likeliest tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables."""
    num_ppo_epochs: int = 4
    """Optimisation passes over each rollout batch."""
    num_mini_batches: int = 1
    """Mini-batches (= optimiser steps) per pass over a rollout batch."""
    micro_batch_size: int | None = None
    """Sequences per forward pass when optimising (gradients accumulate over a mini-batch); default: all."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty against the reference (the initial value when adaptive)."""
    adaptive_kl: bool = False
    """Adapt kl_coef after each rollout so that the KL approaches target_kl (Ziegler et al. 2019, eq. 2)."""
    target_kl: float = 6.0
    """KL per sequence (nats) the adaptive controller steers towards."""
    kl_horizon: int = 10000
    """Samples over which the adaptive controller corrects a KL error; smaller reacts faster."""
    gamma: float = 1.0
    """Discount of future rewards in GAE; 1.0 (no discount) suits one terminal score per completion."""
    lam: float = 0.95
    """GAE's λ: trades the advantage's bias (λ→0) against its variance (λ→1)."""
    cliprange: float = 0.2
    """PPO's ε: the policy ratio is clipped to [1-ε, 1+ε], so one rollout cannot move the policy far."""
    cliprange_value: float = 0.2
    """Values may move at most this far from the rollout's estimates per update (clipped value loss)."""
    vf_coef: float = 0.1
    """Weight of the value loss beside the policy loss."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean and unit variance over each rollout batch."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a completion cut at max_new_tokens, teaching the policy to finish."""
    disable_dropout: bool = True
    """Turn off dropout, so rollout log-probs and the first update's log-probs agree (ratio 1), as TRL does."""

    def __post_init__(self):
        if (self.reward_model is None) == (self.reward_function is None):
            raise ValueError("ppo needs exactly one reward source: reward_model (a reward run directory) or "
                             "reward_function (module:function)")
        if self.max_new_tokens < 1 or self.num_ppo_epochs < 1 or self.num_mini_batches < 1:
            raise ValueError("ppo max_new_tokens, num_ppo_epochs and num_mini_batches must be >= 1")
        if not 0 < self.cliprange < 1 or self.cliprange_value <= 0:
            raise ValueError("ppo cliprange must be in (0, 1) and cliprange_value positive")


# -- the math, as pure functions ----------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over ``[batch, time]`` tensors; ``mask`` marks each row's actions.

    ``δ_t = r_t + γ V_{t+1} - V_t`` and ``A_t = δ_t + γλ A_{t+1}``; past a row's last action V and r are 0, so the
    episode ends there. Returns (advantages, returns = advantages + values), zero outside the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total=lambda t: t) -> torch.Tensor:
    """Zero mean, unit (unbiased) variance over the masked entries, as TRL's ``masked_whiten``; ``total`` sums a
    tensor over the ranks of a distributed run, so the statistics are those of the whole global rollout."""
    mask = mask.to(x.dtype)
    n, x_sum = total(torch.stack([mask.sum(), (x * mask).sum()]))
    mean = x_sum / n
    var = total((((x - mean) * mask) ** 2).sum()) / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, cliprange: float, cliprange_value: float,
             vf_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped PPO loss (policy + vf_coef · value) over flat ``[tokens]`` tensors, and per-token stats."""
    ratio = torch.exp(logps - old_logps)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    policy_loss = torch.max(pg_losses, pg_losses_clipped)  # the pessimistic bound (PPO eq. 7)
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    value_loss = 0.5 * torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    stats = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
             "clipfrac": (pg_losses_clipped > pg_losses).float(),
             "approx_kl": 0.5 * (logps - old_logps).detach() ** 2}
    return policy_loss + vf_coef * value_loss, stats


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019's proportional controller: ``β ← β (1 + clip(KL/target - 1, ±0.2) · n / horizon)``."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


class ValueHead(nn.Module):
    """``Linear(hidden, 1)`` in float32, zero-initialised: values start at 0 and add no noise to the first
    advantages."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)  # TRL's ValueHead names it ``summary``
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


def spread(flat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Put per-action values back on the ``[batch, time]`` grid (zero elsewhere)."""
    out = torch.zeros(keep.shape, dtype=flat.dtype, device=flat.device)
    out[keep] = flat
    return out


# -- the objective --------------------------------------------------------------------------------------


@register
class PPO(Objective):
    name = "ppo"
    aliases = ("rlhf", "ppo_rlhf")
    kinds = ("prompt", "preference")  # a preference record contributes its prompt
    config_class = PPOConfig
    needs_reference = True
    online = True

    def __init__(self, tokenizer, options: dict[str, Any] | None = None):
        super().__init__(tokenizer, options)
        self.kl_coef = self.config.kl_coef
        self.rollouts = 0  # seeds each rollout's sampling; checkpointed
        self.value_head: ValueHead | None = None
        self.reward_function = (load_reward_function(self.config.reward_function)
                                if self.config.reward_function is not None else None)
        self.reward_model = None

    # -- data -----------------------------------------------------------------------------------------
    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[PromptItem]:
        examples = examples_of_kind(examples, self.kinds, "PPO (it needs prompts)")
        items, report = prompts_within([tokenize_prompt(self.tokenizer, ex) for ex in examples], max_length,
                                       self.config.max_length_policy)
        log.info("%s: %s", split, report.message(max_length))
        self.length_report = report
        return items

    def collate(self, items: list[PromptItem]) -> dict[str, Any]:
        return {"items": items}  # prompts stay token lists: the rollout pads them itself

    def units(self, batch: dict[str, Any]) -> int:
        if "items" in batch:  # a prompt batch (evaluation): the loss is the negated mean reward per prompt
            return len(batch["items"])
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # sampled tokens

    # -- set-up and state -------------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        device = next(model.parameters()).device
        if self.config.disable_dropout:
            disable_dropout(model)
        if self.value_head is None:
            self.value_head = ValueHead(model.get_input_embeddings().embedding_dim).to(device)
        if self.config.reward_model is not None and self.reward_model is None:
            from .reward import load_reward_model

            self.reward_model = load_reward_model(self.config.reward_model_base, self.config.reward_model,
                                                  device=str(device))

    def extra_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self.value_head is None:
            raise RuntimeError("call setup(model, ctx) before extra_parameters(): the value head is sized there")
        return [(f"value_head.{n}", p) for n, p in self.value_head.named_parameters()]

    def training_state(self) -> dict[str, torch.Tensor]:
        return {"kl_coef": torch.tensor(self.kl_coef, dtype=torch.float64),
                "rollouts": torch.tensor(self.rollouts, dtype=torch.int64)}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if "kl_coef" in state:
            self.kl_coef, self.rollouts = float(state["kl_coef"]), int(state["rollouts"])

    # -- rollout ----------------------------------------------------------------------------------------
    def sample(self, model: nn.Module, items: list[PromptItem], do_sample: bool = True,
               ctx: TrainContext | None = None) -> tuple[list[list[int]], list[bool]]:
        """Completions (closed by EOS when the policy stopped) and whether each stopped on its own."""
        c = self.config
        return sample_completions(model, self.tokenizer, [i.input_ids for i in items],
                                  max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                  top_k=c.top_k, seed=c.seed * 1_000_003 + self.rollouts, do_sample=do_sample, ctx=ctx)

    def score(self, items: list[PromptItem], completions: list[list[int]], stopped: list[bool]) -> torch.Tensor:
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        if self.reward_function is not None:
            scores = call_reward_function(self.reward_function, [i.text for i in items], texts,
                                          [i.fields for i in items])
        else:
            scores = self.reward_model.score([i.messages for i in items], texts)
        scores = torch.tensor(scores, dtype=torch.float32)
        if self.config.missing_eos_penalty is not None:
            scores -= self.config.missing_eos_penalty * (~torch.tensor(stopped)).float()
        return scores

    @torch.no_grad()
    def rollout(self, model: nn.Module, items: list[PromptItem], ctx: TrainContext
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Sample, score, and turn the scores into per-token advantages and returns (steps 1-3 above)."""
        c = self.config
        completions, stopped = self.sample(model, items, ctx=ctx)
        device = next(model.parameters()).device
        batch = pad_batch([Tokenized(i.input_ids + ids, [IGNORE_INDEX] * len(i.input_ids) + ids, i.source)
                           for i, ids in zip(items, completions)], self.tokenizer.pad_token_id)
        batch = to_device(batch, device)
        logits, targets, hidden, keep = action_outputs(model, batch)
        old_logps, values = token_logps(logits, targets), self.value_head(hidden)
        del logits
        with ctx.reference() as reference:
            ref_logps = target_token_logps(reference, batch)
        scores = self.score(items, completions, stopped).to(device)

        kl = spread(old_logps - ref_logps, keep)
        rewards = -self.kl_coef * kl
        positions = torch.arange(keep.shape[1], device=device)
        last = (positions * keep).argmax(-1)  # each completion's final action gets the score
        rewards[torch.arange(len(items), device=device), last] += scores
        advantages, returns = gae(rewards, spread(values, keep), keep, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, keep, total=ctx.across_ranks)
        batch.update(old_logps=spread(old_logps, keep), old_values=spread(values, keep), advantages=advantages,
                     returns=returns)

        # Means over the whole global rollout (every rank's prompts), so the adaptive KL coefficient stays the same
        # on every rank.
        n, score_sum, kl_sum, length_sum, stopped_sum = ctx.across_ranks(torch.stack([
            torch.tensor(float(len(items)), device=device), scores.sum(), kl.sum(), keep.sum().float(),
            torch.tensor(float(sum(stopped)), device=device)])).tolist()
        kl_per_sequence = kl_sum / n
        stats = {"reward": score_sum / n, "kl": kl_per_sequence, "kl_coef": self.kl_coef,
                 "response_length": length_sum / n, "stopped": stopped_sum / n}
        if c.adaptive_kl:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, kl_per_sequence, c.target_kl, c.kl_horizon, int(n))
        self.rollouts += 1
        return batch, stats

    def optimizer_steps_per_batch(self) -> int:
        """How many optimiser steps one batch of prompts becomes (the trainer sizes the run with it)."""
        return self.config.num_ppo_epochs * self.config.num_mini_batches

    def rollout_steps(self, model: nn.Module, prompt_batch: dict[str, Any], ctx: TrainContext
                      ) -> list[list[dict[str, Any]]]:
        """Roll out once; ``num_ppo_epochs × num_mini_batches`` optimiser steps of micro-batches on it."""
        c = self.config
        rollout, stats = self.rollout(model, prompt_batch["items"], ctx)
        return optimizer_steps(rollout, c.num_ppo_epochs, c.num_mini_batches, c.micro_batch_size,
                               c.seed * 1_000_003 + self.rollouts, stats)

    # -- loss -------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        if "items" in batch:
            return self.evaluation_loss(model, batch["items"], ctx)
        c = self.config
        logits, targets, hidden, keep = action_outputs(model, batch)
        logps = token_logps(logits, targets)
        losses, stats = ppo_loss(logps, batch["old_logps"][keep], batch["advantages"][keep],
                                 self.value_head(hidden), batch["old_values"][keep], batch["returns"][keep],
                                 c.cliprange, c.cliprange_value, c.vf_coef)
        with torch.no_grad():
            logits = logits.float()
            entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
        loss = losses.sum()
        units = int(keep.sum())
        metrics = {"loss": loss.detach(), "entropy": entropy.sum(), **{k: v.detach().sum() for k, v in stats.items()}}
        # Rollout statistics are one number per step; the trainer divides metric sums by the step's units,
        # so they travel as value × units.
        metrics.update({k: v * units for k, v in batch["rollout_stats"].items()})
        return loss, metrics

    @torch.no_grad()
    def evaluation_loss(self, model: nn.Module, items: list[PromptItem], ctx: TrainContext | None = None
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        """Held-out prompts: greedy completions' summed reward, negated as a loss (lower is better)."""
        completions, stopped = self.sample(model, items, do_sample=False, ctx=ctx)
        total = self.score(items, completions, stopped).sum().item()
        return torch.tensor(-total), {"loss": -total, "reward": total}
