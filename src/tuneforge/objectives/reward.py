"""Reward modelling: a scalar head on the language model, trained on preference pairs (Bradley–Terry).

The reward of a (prompt, response) is ``head(h)``, where ``h`` is the final hidden state at the sequence's last
real token (the response's closing EOS), as in Ouyang et al. 2022 and TRL's reward models. Pairs are trained
with ``-log σ(r_chosen - r_rejected - margin)``; TRL's optional per-record ``margin`` and
``center_rewards_coefficient`` (Eisenstein et al. 2023: keeps rewards centred on zero) are supported.

Any method trains the backbone (LoRA trains its adapter, full fine-tuning every weight); the head always trains.
It is saved beside the method's files as ``reward_head.safetensors``, so :func:`load_reward_model` (used by
``tuneforge score``, evaluation and PPO) rebuilds the scorer from the run directory alone.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..data.batching import pad_batch, to_device
from ..data.formats import Message
from ..data.packing import example_index, is_packed, model_inputs
from ..data.preference import tokenize_response
from .base import ObjectiveConfig, PairObjective, TrainContext, disable_dropout, register
from ..models.logprobs import accepts_logits_mask

log = logging.getLogger(__name__)

REWARD_HEAD_NAME = "reward_head.safetensors"


@dataclasses.dataclass
class RewardConfig(ObjectiveConfig):
    """Options of reward modelling (names as in TRL's RewardConfig)."""

    objective: ClassVar[str] = "reward"

    center_rewards_coefficient: float | None = None
    """Adds coefficient x mean((r_chosen + r_rejected)^2) to the loss, pulling rewards towards zero mean so
    scores from different runs are comparable (Eisenstein et al. 2023 suggest 0.01); None disables it."""
    disable_dropout: bool = True
    """Turn off the model's dropout (TRL's default): a reward should not depend on a random mask."""


class RewardHead(nn.Module):
    """``Linear(hidden, 1)`` in float32 on top of the (possibly bf16) backbone."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        # Stiennon et al. 2020 (Appendix C.2) draw the reward head from N(0, 1/(d_model + 1)).
        nn.init.normal_(self.score.weight, std=(hidden_size + 1) ** -0.5)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.float()).squeeze(-1)


def hidden_size_of(model: nn.Module) -> int:
    return model.get_input_embeddings().embedding_dim


def last_token_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden state at each example's last token: ``[examples, hidden]`` (padded rows or packed segments)."""
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if accepts_logits_mask(model) else {}  # skip the vocabulary
    input_ids = batch["input_ids"]
    out = model(**model_inputs(batch), output_hidden_states=True, **kwargs)
    hidden = out.hidden_states[-1][:, -input_ids.shape[1]:]  # a prompt-tuning method's virtual tokens come first
    if is_packed(batch):
        example_of, count = example_index(batch)
        # A segment's last position: the next position belongs to another example (or the row ends).
        following = torch.cat([example_of[:, 1:], example_of.new_full((len(example_of), 1), -1)], dim=1)
        last = (example_of >= 0) & (following != example_of)
        scores = hidden.new_empty((count, hidden.shape[-1]))
        scores[example_of[last]] = hidden[last]
        return scores
    attention_mask = batch["attention_mask"]
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask).argmax(-1)  # works for right and left padding
    return hidden[torch.arange(len(last), device=last.device), last]


def reward_scores(model: nn.Module, head: RewardHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar reward per example: ``[examples]`` float32."""
    return head(last_token_hidden(model, batch))


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair Bradley–Terry loss ``-log σ(r_c - r_r - margin)`` (+ TRL's centring term): ``[pairs]``."""
    losses = -F.logsigmoid(chosen - rejected - (margin if margin is not None else 0.0))
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


@register
class Reward(PairObjective):
    name = "reward"
    aliases = ("reward_model", "rm", "reward_modeling", "reward_modelling")
    purpose = "reward modelling"
    config_class = RewardConfig

    def __init__(self, tokenizer, options: dict[str, Any] | None = None):
        super().__init__(tokenizer, options)
        self.head: RewardHead | None = None

    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)
        if self.head is None:
            self.head = RewardHead(hidden_size_of(model)).to(next(model.parameters()).device)

    def extra_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self.head is None:
            raise RuntimeError("call setup(model, ctx) before extra_parameters(): the reward head is sized there")
        return [(f"reward_head.{n}", p) for n, p in self.head.named_parameters()]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, float]]:
        scores = reward_scores(model, self.head, batch)
        chosen, rejected = scores.chunk(2)
        losses = reward_loss(chosen, rejected, batch.get("margin"), self.config.center_rewards_coefficient)
        loss = losses.sum()
        c, r = chosen.detach(), rejected.detach()
        return loss, {"loss": loss.detach(), "accuracy": (c > r).sum(), "rewards/chosen": c.sum(),
                      "rewards/rejected": r.sum(), "rewards/margins": (c - r).sum()}

    def save(self, directory) -> None:
        save_reward_head(self.head, directory, getattr(self.tokenizer, "chat_template", None))


# -- the trained reward model, for scoring ------------------------------------------------------------


def save_reward_head(head: RewardHead, directory: str | Path, chat_template: str | None = None) -> Path:
    """``reward_head.safetensors``; the chat template used in training travels in its metadata, so scoring
    renders (prompt, response) exactly as training did."""
    path = Path(directory) / REWARD_HEAD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    metadata = {"format": "pt", **({"chat_template": chat_template} if chat_template else {})}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_reward_head(directory: str | Path) -> tuple[RewardHead, str | None]:
    path = Path(directory) / REWARD_HEAD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {REWARD_HEAD_NAME} in {directory}: it is not a reward model trained by "
                                "tuneforge (objective: reward)")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        chat_template = (f.metadata() or {}).get("chat_template")
    head = RewardHead(tensors["score.weight"].shape[1])
    head.load_state_dict(tensors)
    return head, chat_template


class RewardModel:
    """A frozen backbone (base + adapter, or a fully fine-tuned model) and its reward head."""

    def __init__(self, model: nn.Module, head: RewardHead, tokenizer, batch_size: int = 8):
        self.model, self.head, self.tokenizer, self.batch_size = model, head, tokenizer, batch_size

    @torch.no_grad()
    def score(self, prompts: list[str | list[Message]], responses: list[str | list[Message]]) -> list[float]:
        """Reward of each (prompt, response); a string prompt is one user turn, a string response one answer."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        items = [tokenize_response(self.tokenizer, _as_messages(p, "user"), _as_messages(r, "assistant"),
                                   f"pair {i}") for i, (p, r) in enumerate(zip(prompts, responses))]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(items), self.batch_size):
            batch = pad_batch(items[start:start + self.batch_size], self.tokenizer.pad_token_id)
            scores = reward_scores(self.model, self.head, to_device(batch, device))
            out += scores.tolist()
        return out


def _as_messages(value: str | list[Message], role: str) -> list[Message]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def load_reward_model(model_name: str | None, adapter_dir: str | Path, *, device: str | None = None,
                      dtype: str | torch.dtype | None = None, batch_size: int = 8) -> RewardModel:
    """Rebuild a trained reward model from its run directory.

    ``adapter_dir`` holds the method's files (an adapter, or a whole model for full fine-tuning) and
    ``reward_head.safetensors``. ``model_name`` is the base model; None reads it from the adapter's config.
    """
    # The backbone loads as for inference (the adapter's method picks how its base loads: QLoRA in 4 bits);
    # imported here so that the objective module itself depends on neither methods nor the loader.
    from ..data.template import ensure_chat_template
    from ..inference.loading import is_full_model_dir, load_for_inference, recorded_base_model

    adapter_dir = Path(adapter_dir)
    head, chat_template = load_reward_head(adapter_dir)
    if model_name is None and not is_full_model_dir(adapter_dir):  # full fine-tuning saved a whole model
        model_name = recorded_base_model(adapter_dir)
        if not model_name:
            raise ValueError(f"{adapter_dir}: neither tuneforge.yaml nor adapter_config.json names a base model; "
                             "pass the base model (--model)")
    model, tokenizer, _ = load_for_inference(model_name or str(adapter_dir), adapter_dir, device=device, dtype=dtype)
    if chat_template:
        tokenizer.chat_template = chat_template
    ensure_chat_template(tokenizer)
    model.eval().requires_grad_(False)
    head.to(next(model.parameters()).device).eval().requires_grad_(False)
    return RewardModel(model, head, tokenizer, batch_size)
