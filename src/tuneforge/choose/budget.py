"""compare's equal-budget mode (``--budget-tokens N``): every method trains on the same number of training tokens.

A step is ``batch_size`` examples whatever the method (packing changes how they are laid out, not which are drawn),
so for one seed the token count of each step is the same for every method: the examples the seed's order draws,
their real tokens (no padding, no virtual tokens). The budget becomes, per seed, the fewest steps whose batches
hold at least N tokens, and every method of that seed runs exactly those steps (its ``--max-steps``); compare's
table shows the tokens each run saw, so the equality can be checked rather than trusted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import RunConfig


def steps_for_tokens(config: RunConfig, budget: int) -> tuple[int, int]:
    """``(steps, tokens)``: the fewest optimiser steps of ``config``'s run whose batches hold at least ``budget``
    real training tokens, and how many they hold. Reads the tokenizer and the data, not the model."""
    from ..data.packing import real_tokens
    from ..data.template import ensure_chat_template
    from ..errors import ConfigError
    from ..models.loading import load_tokenizer
    from ..run.training_data import EpochSampler, training_data

    if config.streaming or config.objective_class.online:
        raise ConfigError("--budget-tokens: needs the data's token counts before training; a stream or an online "
                          "objective (it makes its own batches) has none: give --max-steps instead")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    ensure_chat_template(tokenizer, override=config.chat_template)
    objective = config.objective_class(tokenizer, config.objective_config())
    items = objective.prepare(training_data(config).train, config.max_length, "train")
    if not items:
        raise ConfigError("--budget-tokens: no training example fits max_length")
    lengths = [real_tokens(objective.collate([item])) for item in items]
    sampler = EpochSampler(len(items), config.seed)
    steps = tokens = 0
    while tokens < budget:
        tokens += sum(lengths[i] for i in sampler.take(config.batch_size))
        steps += 1
    return steps, tokens
