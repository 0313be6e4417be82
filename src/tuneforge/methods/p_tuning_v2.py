"""P-Tuning v2: deep prompts at every layer, trained directly (Liu et al. 2022, arXiv:2110.07602).

The mechanism is Prefix Tuning's (``prefix_tuning.py``: key/value prefixes injected through the KV cache of every
layer, mask extended, real tokens only outside); this file only changes the recipe. How it differs here:

- **Reparameterisation off by default.** ``prefix_projection=False``: the trainable tensor *is* the prefix,
  ``[N, num_layers·2·d]``. The paper found the MLP's benefit task-dependent; ``prefix_projection=True`` turns it
  back on (then the method equals Prefix Tuning apart from its defaults).
- **Initialisation.** The prefix keys/values start as N(0, 1) samples directly (``nn.Embedding``'s default, as in
  the authors' code and PEFT), instead of as the MLP's output for a random N(0, 1) embedding.
- **Length and learning rate.** Short prompts for simple classification (≲ 20 virtual tokens), long ones (~100)
  for hard sequence labelling; learning rates of order 1e-3–1e-2, far above Prefix Tuning's (the paper used
  5e-5 with its MLP), since the raw prefix has no MLP to amplify updates.
- **Use.** Natural-language *understanding* (classification, labelling, extractive QA written as generation),
  where it approaches full fine-tuning across model sizes; Prefix Tuning targets generation tasks.

Both save PEFT's ``PREFIX_TUNING`` format (``prompt_embeddings`` ``[N, num_layers·2·d]``; here with
``prefix_projection: false``), so ``peft.PeftModel.from_pretrained`` loads either one.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from .base import register
from .prefix_tuning import PrefixTuning, PrefixTuningConfig


@dataclasses.dataclass
class PTuningV2Config(PrefixTuningConfig):
    """Options of P-Tuning v2: Prefix Tuning's options with the prefix trained directly by default."""

    method: ClassVar[str] = "p_tuning_v2"

    num_virtual_tokens: int = 20
    """Prompt length N at every layer: ≲ 20 suits simple classification, ~100 hard sequence labelling."""
    prefix_projection: bool = False
    """Train the key/value prefix directly (False, the paper's default) or through Prefix Tuning's MLP (True)."""


@register
class PTuningV2(PrefixTuning):
    name = "p_tuning_v2"
    config_class = PTuningV2Config
    aliases = ("ptuning_v2", "deep_prompt_tuning")
    default_learning_rate = 1e-2  # raw N(0, 1) prefixes need large steps (the authors use 5e-3..1e-2)
