"""Log-probabilities of labelled tokens: the one place every objective (and evaluation) gets them from.

Logits are computed only where a loss needs them: transformers' ``logits_to_keep`` takes a boolean mask of
positions, so the vocabulary projection (a large share of a small model's compute) and its float32 logits never
touch prompt or padding positions. Older transformers releases accept only an int / index tensor there; those
fall back to full logits, indexed afterwards (same numbers, more memory).

Labels are aligned with ``input_ids`` (Hugging Face's convention): position t predicts ``labels[t + 1]``.
"""

from __future__ import annotations

import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packing import example_index, model_inputs
from ..data.template import IGNORE_INDEX
from .linear_cross_entropy import linear_cross_entropy_sum, linear_token_logps

# Per model class: whether its forward takes a boolean logits_to_keep mask. Keyed weakly by class, so nothing is
# stored on the user's model and a class that proves unable (IndexError) is remembered.
_MASK_SUPPORT: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def accepts_logits_mask(model: nn.Module) -> bool:
    """Whether ``model`` computes logits only at a boolean ``[batch, time]`` mask of positions."""
    cls = type(model)
    if cls not in _MASK_SUPPORT:
        import transformers.modeling_utils as mu

        # Releases without slice_logits_to_keep accept an int / index tensor only.
        _MASK_SUPPORT[cls] = ("logits_to_keep" in inspect.signature(model.forward).parameters
                              and hasattr(mu, "slice_logits_to_keep"))
    return _MASK_SUPPORT[cls]


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, time]`` mask of the positions that predict a labelled token (the last position predicts none)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


# Above this many [positions x vocab] logits (256 MiB in float32) the loss fuses the output projection with the
# cross-entropy, chunk by chunk (linear_cross_entropy.py), instead of asking the model for logits.
FUSE_FROM_LOGITS = 2**26
# Config fields that change logits after the projection (Gemma's soft-capping, Cohere's and Granite's scales): such
# models always go through their own forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fusable_head(model: nn.Module, labels: torch.Tensor) -> nn.Linear | None:
    """The output projection, when this batch's loss should fuse it with the cross-entropy: many logits, a plain
    linear head (no adapter on it, not sharded), nothing applied to the logits after it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or type(head.weight).__name__ == "DTensor":
        return None
    if labels.numel() * head.weight.shape[0] < FUSE_FROM_LOGITS or not accepts_logits_mask(model):
        return None
    if any(getattr(model.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


def target_hidden(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = ""
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states at the positions that predict a supervised label, ``([n, hidden], [n] targets)``:
    what the output projection would read. The model computes no logits (an empty ``logits_to_keep`` mask)."""
    labels = batch[f"{prefix}labels"]
    keep = supervised_positions(labels)
    out = model(**model_inputs(batch, prefix), output_hidden_states=True, logits_to_keep=torch.zeros_like(keep))
    hidden = out.hidden_states[-1][:, -labels.shape[1]:]  # a prompt-tuning method's virtual tokens come first
    return hidden[keep], labels[:, 1:][keep[:, :-1]]


def target_token_logps(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """log p(label) at every supervised position, float32 ``[n]`` (fused with the projection for large batches)."""
    head = fusable_head(model, batch[f"{prefix}labels"])
    if head is not None:
        hidden, targets = target_hidden(model, batch, prefix)
        return linear_token_logps(hidden, head.weight, head.bias, targets)
    return token_logps(*target_logits(model, batch, prefix))


def target_logits(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = ""
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a supervised label, flattened: ``([n, vocab], [n] targets)``, for a
    padded or a packed batch (its ``prefix``-ed keys: KTO's mismatched ``kl_`` batch)."""
    labels = batch[f"{prefix}labels"]
    inputs = model_inputs(batch, prefix)
    keep = supervised_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    if accepts_logits_mask(model):
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
        except IndexError:  # a release that indexes hidden states with logits_to_keep as a 1-D slice
            _MASK_SUPPORT[type(model)] = False
        else:
            if logits.dim() == 2:  # transformers gathered only the kept positions
                return logits, targets
    logits = model(**inputs).logits
    return logits[keep], targets


def action_outputs(model: nn.Module, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``target_logits``, plus the final hidden states ``[n, hidden]`` at the same positions (a value or reward
    head reads them) and the ``[batch, time]`` position mask (row-major, as the flat tensors)."""
    labels = batch["labels"]
    keep = supervised_positions(labels)
    kwargs = {"logits_to_keep": keep} if accepts_logits_mask(model) else {}
    out = model(**model_inputs(batch), output_hidden_states=True, **kwargs)
    logits = out.logits if out.logits.dim() == 2 else out.logits[:, -labels.shape[1]:][keep]
    hidden = out.hidden_states[-1][:, -labels.shape[1]:][keep]  # a prompt-tuning method's virtual tokens first
    return logits, labels[:, 1:][keep[:, :-1]], hidden, keep


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row of ``logits``, in float32."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def token_cross_entropy_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised tokens, and their count."""
    head = fusable_head(model, batch["labels"])
    if head is not None:
        hidden, targets = target_hidden(model, batch)
        return linear_cross_entropy_sum(hidden, head.weight, head.bias, targets), int(targets.numel())
    logits, targets = target_logits(model, batch)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, int(targets.numel())


def per_example_sum(values: torch.Tensor, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Per-token ``values`` (one per supervised target, in ``target_logits`` order) summed per example:
    ``[examples]``, in the order the examples were collated (padded rows or packed segments alike)."""
    example_of, count = example_index(batch, prefix)
    labels = batch[f"{prefix}labels"]
    owner = example_of[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    return torch.zeros(count, device=values.device, dtype=values.dtype).index_add(0, owner, values)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Sum of log p(label) over each example's supervised tokens: ``[examples]`` (DPO's sequence log-probability)."""
    return per_example_sum(target_token_logps(model, batch, prefix), batch, prefix)


def response_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Supervised (response) tokens per example: ``[examples]``."""
    labels = batch["labels"]
    ones = torch.ones(int((labels[:, 1:] != IGNORE_INDEX).sum()), device=labels.device, dtype=torch.long)
    return per_example_sum(ones, batch)


def chosen_nll(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood per token over all chosen responses of the batch, from their summed
    log-probabilities (DPO's RPO term, TRL's "sft" loss; ORPO's and CPO's NLL term)."""
    return -policy_chosen.sum() / chosen_lengths.sum().clamp(min=1)
