"""P-Tuning: virtual tokens produced by a trainable prompt encoder (Liu et al. 2021, "GPT Understands, Too",
arXiv:2103.10385).

Like Prompt Tuning, ``num_virtual_tokens`` embeddings are prepended at the input layer (``virtual_tokens.py``),
but they are the output of a small network over a free embedding table, ``h_i = MLP(LSTM(e_1..e_N))_i`` or
``MLP(e_i)``: the paper found the reparameterisation makes the prompts train faster and more stably than free
vectors. The encoder is PEFT's ``PromptEncoder`` layer for layer, so the trainable-parameter count is PEFT's.

Only the encoder's output is saved (PEFT's ``prompt_embeddings``, ``[num_virtual_tokens, hidden]``): the
encoder exists only for training. A loaded P-Tuning adapter is therefore a fixed prompt for inference, as in
PEFT; to keep training, resume from a training checkpoint (it holds the encoder's weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from .base import Method, MethodConfig, freeze, model_dims, register
from .virtual_tokens import PromptEmbedding, VirtualTokens, VirtualTokensHandle, check_peft_prompt_config, install

ENCODER_TYPES = ("MLP", "LSTM")


@dataclasses.dataclass
class PTuningConfig(MethodConfig):
    """Options of P-Tuning (names as in PEFT's PromptEncoderConfig)."""

    num_virtual_tokens: int = 20
    """How many virtual tokens are prepended to every sequence."""
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    """The prompt encoder: MLP (three linear layers with ReLU, PEFT's recommendation) or LSTM (a bidirectional LSTM
    then a two-layer MLP, the paper's encoder: each virtual token sees the others)."""
    encoder_hidden_size: int | None = None
    """Width of the encoder's hidden layers; default: the model's hidden size."""
    encoder_num_layers: int = 2
    """Layers of the LSTM (the MLP always has exactly three linear layers, as in PEFT)."""
    encoder_dropout: float = 0.0
    """Dropout between the LSTM's layers (unused by the MLP, as in PEFT)."""

    def __post_init__(self):
        self.encoder_reparameterization_type = str(self.encoder_reparameterization_type).upper()
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_reparameterization_type must be MLP or LSTM, "
                             f"got {self.encoder_reparameterization_type!r}")
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


class PromptEncoder(VirtualTokens):
    """PEFT's ``PromptEncoder``: an ``embedding`` table fed through ``mlp_head`` (after ``lstm_head`` for LSTM)."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, hidden: int, encoder_type: str, num_layers: int,
                 dropout: float):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.encoder_type = encoder_type
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=hidden, num_layers=num_layers,
                                     dropout=dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, token_dim))

    def forward(self) -> torch.Tensor:
        embeds = self.embedding.weight
        if self.encoder_type == "LSTM":
            # The LSTM runs over the virtual tokens as one sequence (batch of one, as PEFT's get_prompt does).
            return self.mlp_head(self.lstm_head(embeds.unsqueeze(0))[0]).squeeze(0)
        return self.mlp_head(embeds)


class PTuningHandle(VirtualTokensHandle):
    config: PTuningConfig
    peft_type = "P_TUNING"

    def adapter_config(self) -> dict[str, Any]:
        c = self.config
        return {
            **super().adapter_config(),
            "encoder_reparameterization_type": c.encoder_reparameterization_type,
            "encoder_hidden_size": encoder_hidden_size(self.model, c),
            "encoder_num_layers": c.encoder_num_layers,
            "encoder_dropout": c.encoder_dropout,
        }

    @property
    def fixed(self) -> bool:
        """True for a loaded adapter: the prompt is the saved encoder output, not trainable."""
        return isinstance(self.prompt, PromptEmbedding)


def encoder_hidden_size(model: nn.Module, config: PTuningConfig) -> int:
    return config.encoder_hidden_size or model_dims(model)["hidden_size"]


def attach_p_tuning(model: nn.Module, config: PTuningConfig) -> PTuningHandle:
    freeze(model)
    token_dim = model.get_input_embeddings().weight.shape[1]
    encoder = PromptEncoder(config.num_virtual_tokens, token_dim, encoder_hidden_size(model, config),
                            config.encoder_reparameterization_type, config.encoder_num_layers, config.encoder_dropout)
    # float32 like PEFT's encoder, on the embeddings' device.
    encoder.to(device=model.get_input_embeddings().weight.device, dtype=torch.float32)
    return PTuningHandle(model, config, install(model, encoder))


def attach_fixed_prompt(model: nn.Module, config: PTuningConfig) -> PTuningHandle:
    """A P-Tuning handle whose prompt is a frozen table, filled by ``load_state_dict`` (PEFT's inference mode)."""
    freeze(model)
    words = model.get_input_embeddings().weight
    prompt = PromptEmbedding(config.num_virtual_tokens, words.shape[1], device=words.device)
    prompt.requires_grad_(False)
    return PTuningHandle(model, config, install(model, prompt))


@register
class PTuning(Method):
    name = "p_tuning"
    packing_refusal = ("it puts its virtual tokens at the start of every row: in a packed row only the first "
                       "example would see them")
    aliases = ("ptuning",)
    config_class = PTuningConfig
    peft_type = "P_TUNING"
    # The encoder is an ordinary network: its steps are smaller than free prompt vectors' (PEFT's P-Tuning example).
    default_learning_rate = 1e-3

    @classmethod
    def attach(cls, model: nn.Module, config: PTuningConfig) -> PTuningHandle:
        return attach_p_tuning(model, config)

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module) -> PTuningConfig:
        data = check_peft_prompt_config(saved, cls.peft_type, model)
        return PTuningConfig(
            num_virtual_tokens=data["num_virtual_tokens"],
            encoder_reparameterization_type=data.get("encoder_reparameterization_type") or "MLP",
            encoder_hidden_size=data.get("encoder_hidden_size"),
            encoder_num_layers=data.get("encoder_num_layers", 2),
            encoder_dropout=data.get("encoder_dropout", 0.0),
        )

    @classmethod
    def attach_saved(cls, model: nn.Module, config: PTuningConfig, saved: dict[str, Any]) -> PTuningHandle:
        """The saved prompt as a fixed, frozen prompt (the encoder that produced it is not saved, as PEFT)."""
        return attach_fixed_prompt(model, config)
