"""What the online objectives (PPO, GRPO) share: they make their own training batches from the current policy.

A batch of prompts becomes one rollout (completions sampled from the policy and scored; see ``rollout``), and the
rollout feeds ``rollout_passes() × num_mini_batches`` optimiser steps. Held-out prompts are scored on greedy
completions instead: the evaluation loss is the negated reward, so lower is better as for every other objective.

A subclass says how a rollout is made (``rollout``), how its micro-batches are scored (``units``, ``loss``), how many
passes it makes over a rollout (``rollout_passes``) and how completions are rewarded (``completion_rewards``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.formats import Example, examples_of_kind
from ..data.preference import PromptItem, prompts_within, tokenize_prompt
from .base import Metrics, Objective, ObjectiveConfig, TrainContext, disable_dropout
from .rollouts import optimizer_steps, sample_completions

PROMPTS = "items"  # a collated batch of prompts: {PROMPTS: [PromptItem, ...]}; the rollout pads them itself


@dataclasses.dataclass
class OnlineConfig(ObjectiveConfig):
    """The rollout options of every online objective (names as in TRL)."""

    reward_model: str | None = None
    """Run directory of a tuneforge reward model (objective: reward) that scores completions (GRPO: after its reward
    functions)."""
    reward_model_base: str | None = None
    """Base model of ``reward_model``; default: the one named in its adapter_config.json."""
    max_new_tokens: int = 64
    """Longest completion sampled per prompt (TRL's max_completion_length; GRPO's dr_grpo divides by it)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; 1.0 samples the policy itself, which the importance ratios assume."""
    top_k: int = 0
    """Sample only among the k likeliest tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables."""
    num_mini_batches: int = 1
    """Mini-batches (= optimiser steps) per pass over a rollout."""
    micro_batch_size: int | None = None
    """Sequences per forward pass when optimising (gradients accumulate over a mini-batch); default: all."""
    disable_dropout: bool = True
    """Turn off dropout, so sampling-time and training-time log-probs agree (ratio 1 at the first step), as TRL does."""


class OnlineObjective(Objective):
    """Base of PPO and GRPO; their configs extend ``OnlineConfig``."""

    config: OnlineConfig

    kinds: ClassVar[tuple[str, ...]] = ("prompt", "preference")  # a preference record contributes its prompt
    needs_reference = True
    online = True

    def __init__(self, tokenizer, options: dict[str, Any] | None = None):
        super().__init__(tokenizer, options)
        self.rollouts = 0  # seeds each rollout's sampling; checkpointed
        self.reward_model: Any = None  # a reward.RewardModel, loaded in setup when the config names one

    # -- what a subclass defines ----------------------------------------------------------------------------
    def rollout(self, model: nn.Module, items: list[PromptItem], ctx: TrainContext
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Sample completions for ``items``, score them, and return the rollout batch and its statistics."""
        raise NotImplementedError

    def rollout_passes(self) -> int:
        """Optimisation passes over each rollout (PPO's num_ppo_epochs, GRPO's num_iterations)."""
        raise NotImplementedError

    def completion_rewards(self, items: list[PromptItem], completions: list[list[int]], stopped: list[bool]
                           ) -> torch.Tensor:
        """One reward per completion (``stopped``: whether each ended on its own, not at max_new_tokens)."""
        raise NotImplementedError

    # -- data -----------------------------------------------------------------------------------------------
    def prepare(self, examples: list[Example], max_length: int, split: str = "train") -> list[PromptItem]:
        examples = examples_of_kind(examples, self.kinds, f"{self.name.upper()} (it needs prompts)")
        items, report = prompts_within([tokenize_prompt(self.tokenizer, ex) for ex in examples], max_length,
                                       self.config.max_length_policy)
        logging.getLogger(type(self).__module__).info("%s: %s", split, report.message(max_length))
        self.length_report = report
        return items

    def collate(self, items: list[PromptItem]) -> dict[str, Any]:
        return {PROMPTS: items}  # prompts stay token lists: the rollout pads them itself

    # -- set-up and state -----------------------------------------------------------------------------------
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

    # -- rollouts -------------------------------------------------------------------------------------------
    def rollout_seed(self) -> int:
        """Each rollout samples (and shuffles its mini-batches) with its own seed, reproducible on resume."""
        return self.config.seed * 1_000_003 + self.rollouts

    def sample(self, model: nn.Module, items: list[PromptItem], do_sample: bool = True,
               ctx: TrainContext | None = None) -> tuple[list[list[int]], list[bool]]:
        """Completions (closed by EOS when the policy stopped) and whether each stopped on its own."""
        c = self.config
        return sample_completions(model, self.tokenizer, [i.input_ids for i in items], max_new_tokens=c.max_new_tokens,
                                  temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, seed=self.rollout_seed(),
                                  do_sample=do_sample, ctx=ctx)

    def optimizer_steps_per_batch(self) -> int:
        """How many optimiser steps one batch of prompts becomes (the trainer sizes the run with it)."""
        return self.rollout_passes() * self.config.num_mini_batches

    def rollout_steps(self, model: nn.Module, prompt_batch: dict[str, Any], ctx: TrainContext
                      ) -> list[list[dict[str, Any]]]:
        """Roll out once; ``rollout_passes() × num_mini_batches`` optimiser steps of micro-batches on it."""
        c = self.config
        rollout, stats = self.rollout(model, prompt_batch[PROMPTS], ctx)
        return optimizer_steps(rollout, self.rollout_passes(), c.num_mini_batches, c.micro_batch_size,
                               self.rollout_seed(), stats)

    # -- evaluation: held-out prompts -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluation_loss(self, model: nn.Module, batch: dict[str, Any], ctx: TrainContext | None = None
                        ) -> tuple[torch.Tensor, Metrics]:
        """Greedy completions' summed reward, negated as a loss (lower is better)."""
        items = batch[PROMPTS]
        completions, stopped = self.sample(model, items, do_sample=False, ctx=ctx)
        total = self.completion_rewards(items, completions, stopped).sum().item()
        return torch.tensor(-total), {"loss": -total, "reward": total}

    def evaluation_units(self, batch: dict[str, Any]) -> int:
        return len(batch[PROMPTS])  # the loss is the negated mean reward per prompt
