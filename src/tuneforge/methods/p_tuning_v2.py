"""P-Tuning v2: deep prompts at every layer, trained directly (Liu et al. 2022, arXiv:2110.07602).

The mechanism is Prefix Tuning's (``prefix_tuning.py``: key/value prefixes injected through the KV cache of every
layer, mask extended, real tokens only outside); this file only changes the recipe. How it differs here:

- **Reparameterisation off by default.** ``prefix_projection=False``: the trainable tensor *is* the prefix,
  ``[N, num_layers·2·d]``. The paper found the MLP's benefit task-dependent; ``prefix_projection=True`` turns it
  back on (then the method equals Prefix Tuning apart from its defaults).
- **Initialisation.** By default the prefix starts as the frozen model's own keys and values for N random
  vocabulary tokens (``prefix_init: vocab``), so step 0 behaves like the base model after N real tokens.
  ``prefix_init: random`` is the authors' code and PEFT: N(0, 1) keys/values, which swamp every layer's attention
  at step 0 (SmolLM2-135M on the demo: answer loss 6.4 instead of 0.58; after 30 steps at lr 1e-2 it is still
  1.0 and exact match 0%).
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

    num_virtual_tokens: int = 20
    """Prompt length N at every layer: ≲ 20 suits simple classification, ~100 hard sequence labelling."""
    prefix_projection: bool = False
    """Train the key/value prefix directly (False, the paper's default) or through Prefix Tuning's MLP (True)."""
    # Unset prefix_init means "vocab" here: the model's own keys/values for N random tokens ("random": N(0, 1), as
    # the paper's code and PEFT). Measured on the demo task in bench/results/methods_table.md.
    default_prefix_init: ClassVar[str] = "vocab"


@register
class PTuningV2(PrefixTuning):
    name = "p_tuning_v2"
    config_class = PTuningV2Config
    aliases = ("ptuning_v2", "deep_prompt_tuning")
    default_learning_rate = 1e-2  # the raw prefix has no MLP to amplify updates (the authors use 5e-3..1e-2)
