"""Held-out quality on preference pairs (``tuneforge eval --data pairs.jsonl``).

* A reward model (a run directory with ``reward_head.safetensors``): accuracy = the share of pairs whose chosen
  answer scores higher, and the mean score margin ``r_chosen - r_rejected``.
* A policy (DPO and the other preference objectives, or any adapter): DPO's implicit reward
  ``β · (log π(y|x) - log π_ref(y|x))`` with the adapter switched off as the reference (for a fully fine-tuned
  model, its recorded base loaded beside it): accuracy = the share of pairs whose chosen answer gets the larger
  implicit reward, and the mean margin — TRL's ``rewards/accuracies`` and ``rewards/margins`` on held-out pairs.
  β is the run's own (its ``tuneforge.yaml``), else DPO's default 0.1.
* Every model also gets ``logp_accuracy``: the share of pairs whose chosen answer has the higher log-likelihood
  under the model alone (no reference), which the base model has too — a before/after comparison.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import yaml
from torch import nn

from ..data.batching import to_device
from ..data.formats import Example, examples_of_kind
from ..data.preference import collate_pairs, tokenize_pair
from ..models.logprobs import sequence_logps

DEFAULT_BETA = 0.1


@torch.no_grad()
def pair_logps(model: nn.Module, tokenizer, examples: list[Example], batch_size: int = 8
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probabilities of every pair: ``(chosen [pairs], rejected [pairs])``."""
    items = [tokenize_pair(tokenizer, ex) for ex in examples]
    device = next(model.parameters()).device
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = to_device(collate_pairs(chunk, tokenizer.pad_token_id), device)
        logps = sequence_logps(model, batch).float().cpu()
        chosen.append(logps[:len(chunk)])
        rejected.append(logps[len(chunk):])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def implicit_reward_metrics(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                            beta: float) -> dict[str, float]:
    """DPO's implicit-reward accuracy and margins from policy and reference log-probabilities."""
    chosen = beta * (policy[0] - reference[0])
    rejected = beta * (policy[1] - reference[1])
    return {"implicit_reward_accuracy": float((chosen > rejected).float().mean()),
            "implicit_reward_margin": float((chosen - rejected).mean()),
            "implicit_reward_chosen": float(chosen.mean()), "implicit_reward_rejected": float(rejected.mean()),
            "beta": beta}


def preference_metrics(model: nn.Module, tokenizer, examples: list[Example], *,
                       reference: Callable[[], ContextManager[nn.Module]] | None = None, beta: float = DEFAULT_BETA,
                       batch_size: int = 8) -> dict[str, Any]:
    """Log-likelihood accuracy of ``model`` on pairs, and with ``reference`` (a context yielding the reference
    model) DPO's implicit-reward accuracy and margin."""
    examples = examples_of_kind(examples, ("preference",), "preference evaluation")
    policy = pair_logps(model, tokenizer, examples, batch_size)
    result: dict[str, Any] = {"n": len(examples),
                              "logp_accuracy": float((policy[0] > policy[1]).float().mean()),
                              "logp_margin": float((policy[0] - policy[1]).mean())}
    if reference is not None:
        with reference() as ref_model:
            ref = pair_logps(ref_model, tokenizer, examples, batch_size)
        result.update(implicit_reward_metrics(policy, ref, beta))
    return result


def reward_accuracy(scorer, examples: list[Example]) -> dict[str, Any]:
    """Accuracy and mean margin of a reward model (``RewardModel``) on held-out pairs."""
    examples = examples_of_kind(examples, ("preference",), "reward-model evaluation")
    chosen = torch.tensor(scorer.score([e.messages for e in examples], [e.chosen for e in examples]))
    rejected = torch.tensor(scorer.score([e.messages for e in examples], [e.rejected for e in examples]))
    return {"n": len(examples), "reward_accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean()), "reward_chosen": float(chosen.mean()),
            "reward_rejected": float(rejected.mean())}


def run_beta(adapter: str | Path | None) -> float:
    """The β the run trained with (its tuneforge.yaml's objective options), else DPO's default."""
    path = Path(adapter) / "tuneforge.yaml" if adapter else None
    if path is None or not path.is_file():
        return DEFAULT_BETA
    saved = yaml.safe_load(path.read_text()) or {}
    beta = (saved.get("objective_options") or {}).get("beta")
    return float(beta) if isinstance(beta, (int, float)) else DEFAULT_BETA


def evaluate_preferences(model_name: str, adapter: str | Path | None, examples: list[Example], *,
                         device: str | None = None, beta: float | None = None) -> dict[str, Any]:
    """The right held-out measure for ``adapter``: a reward model's accuracy, or a policy's implicit reward."""
    from ..inference.loading import is_full_model_dir, load_for_inference, recorded_base_model
    from ..objectives.reward import REWARD_HEAD_NAME, load_reward_model

    if adapter and (Path(adapter) / REWARD_HEAD_NAME).is_file():
        scorer = load_reward_model(model_name, adapter, device=device)
        return reward_accuracy(scorer, examples)
    model, tokenizer, handle = load_for_inference(model_name, adapter, device)
    reference = None
    if handle is not None:
        reference = lambda: _disabled(handle, model)  # noqa: E731 - the adapter off is the frozen start
    elif adapter and is_full_model_dir(adapter) and recorded_base_model(adapter):
        reference = lambda: _loaded(recorded_base_model(adapter), device)  # noqa: E731
    return preference_metrics(model, tokenizer, examples, reference=reference,
                              beta=beta if beta is not None else run_beta(adapter))


@contextlib.contextmanager
def _disabled(handle, model: nn.Module):
    with handle.disabled():
        yield model


@contextlib.contextmanager
def _loaded(model_name: str, device: str | None):
    from ..inference.loading import load_for_inference

    model, _, _ = load_for_inference(model_name, None, device)
    try:
        yield model
    finally:
        del model


__all__ = ["preference_metrics", "reward_accuracy", "implicit_reward_metrics", "evaluate_preferences", "pair_logps"]
