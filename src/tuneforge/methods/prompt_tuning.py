"""Prompt Tuning: trainable virtual-token embeddings in front of the input (Lester et al. 2021, arXiv:2104.08691).

The only trainable tensor is ``P: [num_virtual_tokens, hidden]``, prepended to every sequence's input
embeddings; the whole model stays frozen. ``methods/virtual_tokens.py`` does the prepending and hides the virtual
positions from callers. Saved in PEFT's format: one tensor ``prompt_embeddings`` and a ``PROMPT_TUNING`` config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import nn

from .base import Method, MethodConfig, freeze, register
from .virtual_tokens import PromptEmbedding, VirtualTokensHandle, check_peft_prompt_config, install

INIT_CHOICES = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclasses.dataclass
class PromptTuningConfig(MethodConfig):
    """Options of Prompt Tuning (names as in PEFT's PromptTuningConfig)."""

    num_virtual_tokens: int = 20
    """How many virtual tokens are prepended; each adds one trainable vector of the model's hidden size."""
    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "SAMPLE_VOCAB"
    """Start values: embeddings of random vocabulary tokens (default: Lester et al. found it beats RANDOM, which
    draws N(0, 1) vectors far from the embedding manifold), or TEXT, the embeddings of prompt_tuning_init_text."""
    prompt_tuning_init_text: str | None = None
    """The hard prompt whose token embeddings start the virtual tokens (TEXT), repeated or cut to the count."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer that splits prompt_tuning_init_text (TEXT) when none is bound with ``bind_tokenizer``; written
    to the adapter config, where PEFT requires it for TEXT."""

    def __post_init__(self):
        self.prompt_tuning_init = str(self.prompt_tuning_init).upper()
        if self.prompt_tuning_init not in INIT_CHOICES:
            raise ValueError(f"prompt_tuning_init must be one of {', '.join(INIT_CHOICES)}, "
                             f"got {self.prompt_tuning_init!r}")
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.prompt_tuning_init_text is not None and not isinstance(self.prompt_tuning_init_text, str):
            raise ValueError(f"prompt_tuning_init_text must be text, got {self.prompt_tuning_init_text!r} "
                             f"({type(self.prompt_tuning_init_text).__name__})")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init TEXT needs prompt_tuning_init_text")
        self.tokenizer = None

    def bind_tokenizer(self, tokenizer: Any) -> "PromptTuningConfig":
        """Use this loaded tokenizer for TEXT (the trainer binds the run's); it wins over tokenizer_name_or_path.
        Not an option: it is not written to disk."""
        self.tokenizer = tokenizer
        return self


def text_init_ids(token_ids: list[int], num_virtual_tokens: int) -> list[int]:
    """Repeat or cut the hard prompt's ids to exactly ``num_virtual_tokens`` (PEFT's PromptEmbedding)."""
    if not token_ids:
        raise ValueError("prompt_tuning_init_text tokenises to no tokens")
    repeated = token_ids * math.ceil(num_virtual_tokens / len(token_ids))
    return repeated[:num_virtual_tokens]


def initial_token_ids(config: PromptTuningConfig, vocab_size: int) -> list[int] | None:
    """Vocabulary ids whose embeddings start the prompt, or None for RANDOM."""
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (config.num_virtual_tokens,)).tolist()
    if config.prompt_tuning_init == "TEXT":
        tokenizer = config.tokenizer
        if tokenizer is None:
            if not config.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init TEXT needs a tokenizer: bind_tokenizer(tok) or "
                                 "tokenizer_name_or_path")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)  # no remote code, as PEFT
        # Tokenised exactly as PEFT does: the tokenizer's default call, special tokens included.
        return text_init_ids(tokenizer(config.prompt_tuning_init_text)["input_ids"], config.num_virtual_tokens)
    return None


def attach_prompt(model: nn.Module, config: PromptTuningConfig, initialise: bool = True) -> "PromptTuningHandle":
    freeze(model)
    words = model.get_input_embeddings()
    prompt = PromptEmbedding(config.num_virtual_tokens, words.weight.shape[1], device=words.weight.device)
    ids = initial_token_ids(config, words.weight.shape[0]) if initialise else None
    if ids is not None:
        with torch.no_grad():
            index = torch.tensor(ids, device=words.weight.device)
            prompt.embedding.weight.copy_(words(index).float())
    return PromptTuningHandle(model, config, install(model, prompt))


class PromptTuningHandle(VirtualTokensHandle):
    config: PromptTuningConfig
    peft_type = "PROMPT_TUNING"

    def adapter_config(self) -> dict[str, Any]:
        c = self.config
        init, tokenizer_name = c.prompt_tuning_init, c.tokenizer_name_or_path
        if init == "TEXT":
            tokenizer_name = tokenizer_name or getattr(c.tokenizer, "name_or_path", None) or None
            tokenizer_name = tokenizer_name or getattr(self.model, "name_or_path", None) or None
            # PEFT refuses a TEXT config without a tokenizer name, though it never tokenises when loading saved
            # weights. With no name to give, write RANDOM: the saved prompt is the same; tuneforge_adapter.json
            # keeps the true options.
            init = init if tokenizer_name else "RANDOM"
        return {
            **super().adapter_config(),
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": c.prompt_tuning_init_text,
            "tokenizer_name_or_path": tokenizer_name,
            "tokenizer_kwargs": None,
        }


@register
class PromptTuning(Method):
    name = "prompt_tuning"
    packing_refusal = ("it puts its virtual tokens at the start of every row: in a packed row only the first "
                       "example would see them")
    aliases = ("soft_prompt",)
    config_class = PromptTuningConfig
    flag_prefix = "prompt"  # --prompt-num-virtual-tokens 20
    peft_type = "PROMPT_TUNING"
    # Free vectors trained from a frozen model need large steps: PEFT's causal-LM prompt-tuning example uses 3e-2
    # (Lester et al. used 0.3 with Adafactor).
    default_learning_rate = 3e-2

    @classmethod
    def attach(cls, model: nn.Module, config: PromptTuningConfig) -> PromptTuningHandle:
        return attach_prompt(model, config)

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module
                          ) -> PromptTuningConfig:
        data = check_peft_prompt_config(saved, cls.peft_type, model)
        return PromptTuningConfig(num_virtual_tokens=data["num_virtual_tokens"],
                                  prompt_tuning_init=data.get("prompt_tuning_init") or "RANDOM",
                                  prompt_tuning_init_text=data.get("prompt_tuning_init_text"),
                                  tokenizer_name_or_path=data.get("tokenizer_name_or_path"))

    @classmethod
    def attach_saved(cls, model: nn.Module, config: PromptTuningConfig, saved: dict[str, Any]
                     ) -> PromptTuningHandle:
        """The saved prompt, trainable again (training can continue from it). The saved values replace any
        initialisation, so the init text is not tokenised again (as PEFT)."""
        return attach_prompt(model, config, initialise=False)
