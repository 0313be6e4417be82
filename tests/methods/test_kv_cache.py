"""The KV cache under its two names (``cache`` from transformers 5.24, ``past_key_values`` before): the helpers, the
virtual-token hooks under either name, and no deprecation warning from tuneforge's own calls."""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from tuneforge.inference.generate import generate_ids
from tuneforge.methods import attach
from tuneforge.methods.kv_cache import (
    NEW_NAME,
    OLD_NAME,
    cache_from_kwargs,
    cache_kwarg,
    library_cache_name,
    output_cache,
    set_cache,
)
from tuneforge.methods.p_tuning_v2 import PTuningV2Config
from tuneforge.methods.prefix_tuning import PrefixTuningConfig
from tuneforge.methods.prompt_tuning import PromptTuningConfig

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = [[5, 17, 99], [8, 41, 7, 63, 22, 90, 11], [120, 3, 56, 77, 30]]
NO_STOP = SimpleNamespace(eos_token_id=None, pad_token_id=0)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


# -- the helpers --------------------------------------------------------------------------------------------


def test_cache_kwarg_is_the_forward_s_own_name():
    model = tiny_llama()
    assert cache_kwarg(model) == library_cache_name()
    assert cache_kwarg(model) in inspect.signature(model.forward).parameters

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None): ...

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None): ...

    class Anything(torch.nn.Module):
        def forward(self, *args, **kwargs): ...

    assert (cache_kwarg(Old()), cache_kwarg(New()), cache_kwarg(Anything())) == \
        (OLD_NAME, NEW_NAME, library_cache_name())


def test_cache_from_kwargs_reads_either_name():
    a, b = DynamicCache(), DynamicCache()
    assert cache_from_kwargs({}) == (None, None)
    assert cache_from_kwargs({"cache": a}) == ("cache", a)
    assert cache_from_kwargs({"past_key_values": a}) == ("past_key_values", a)
    # A None under one name and a cache under the other: the cache, whatever the order.
    assert cache_from_kwargs({"cache": None, "past_key_values": a}) == ("past_key_values", a)
    assert cache_from_kwargs({"past_key_values": None, "cache": a}) == ("cache", a)
    assert cache_from_kwargs({"past_key_values": None}) == ("past_key_values", None)
    assert cache_from_kwargs({"cache": a, "past_key_values": a}) == ("cache", a)
    with pytest.raises(ValueError, match="two caches"):
        cache_from_kwargs({"cache": a, "past_key_values": b})


def test_set_cache_writes_one_name_only():
    a = DynamicCache()
    assert set_cache({"cache": None, "past_key_values": None, "x": 1}, "cache", a) == {"cache": a, "x": 1}
    assert set_cache({"cache": None}, "past_key_values", a) == {"past_key_values": a}


def test_output_cache_reads_the_current_field():
    model = tiny_llama()
    with no_cache_deprecation_warnings():
        out = model(input_ids=torch.tensor([PROMPTS[0]]), use_cache=True)
        cache = output_cache(out)
    assert cache is not None and cache.get_seq_length() == len(PROMPTS[0])
    assert output_cache(SimpleNamespace(past_key_values=cache)) is cache  # an output from before the rename


# -- no deprecation warning from tuneforge's own calls ------------------------------------------------------


@contextlib.contextmanager
def no_cache_deprecation_warnings() -> Iterator[None]:
    """Fail on any warning about the old cache names: a FutureWarning / DeprecationWarning (transformers'
    ``deprecate_kwarg`` on a forward called with ``past_key_values``) raises, and so does a log record from the
    transformers loggers (``ModelOutput.past_key_values`` logs through ``logger.warning_once``, cached per process:
    the cache is cleared so that an earlier test's warning cannot hide ours)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    library_logger = logging.getLogger("transformers")
    handler, level = Collect(logging.WARNING), library_logger.level
    library_logger.addHandler(handler)
    library_logger.setLevel(logging.WARNING)
    getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("error", message=".*(past_key_values|cache_params)", category=category)
            yield
    finally:
        library_logger.removeHandler(handler)
        library_logger.setLevel(level)
    deprecations = [r.getMessage() for r in records if "past_key_values" in r.getMessage()]
    assert not deprecations, deprecations


def test_the_checker_sees_both_kinds_of_warning():
    """The old names do warn on a model that takes ``cache``; the checker must catch each kind."""
    model = tiny_llama()
    if cache_kwarg(model) != NEW_NAME:
        pytest.skip("this transformers takes past_key_values: nothing is deprecated")
    out = model(input_ids=torch.tensor([PROMPTS[0]]), use_cache=True)
    with pytest.raises(FutureWarning, match="past_key_values"), no_cache_deprecation_warnings():
        model(input_ids=torch.tensor([[1]]), past_key_values=output_cache(out))
    with pytest.raises(AssertionError, match="past_key_values"), no_cache_deprecation_warnings():
        out.past_key_values  # noqa: B018


def method_configs():
    return [
        pytest.param(None, id="base"),
        pytest.param(PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="RANDOM"), id="prompt_tuning"),
        pytest.param(PrefixTuningConfig(num_virtual_tokens=4), id="prefix_tuning"),
        # prefix_init vocab runs the model once at attach time (own_key_values reads the returned cache).
        pytest.param(PTuningV2Config(num_virtual_tokens=4, prefix_init="vocab"), id="p_tuning_v2_vocab"),
    ]


@pytest.mark.parametrize("config", method_configs())
@torch.no_grad()
def test_no_deprecation_warning_from_our_calls(config):
    """Attach, a training-style forward, our generate loop and HF generate: none warns about past_key_values."""
    with no_cache_deprecation_warnings():
        model = tiny_llama()
        if config is not None:
            attach(model, config)
        ids = torch.tensor([PROMPTS[1]])
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        ours = generate_ids(model, NO_STOP, PROMPTS, max_new_tokens=4, batch_size=3)
        hf = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert hf[0, len(PROMPTS[0]):].tolist() == ours[0]


# -- a caller's own cache under the old name ----------------------------------------------------------------


def cached_greedy(model, prompt: list[int], steps: int, key: str) -> list[int]:
    """Greedy decoding with the cache passed back under ``key``, whatever the model's own name."""
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    tokens = []
    for _ in range(steps):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{key: output_cache(out)})
    return tokens


@pytest.mark.parametrize("config", method_configs()[1:])
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@torch.no_grad()
def test_the_old_name_still_works_where_the_model_takes_cache(config):
    """A caller's code that passes ``past_key_values`` to a 5.24 model (transformers renames it, with a warning)
    decodes as with ``cache``: the hooks find the cache under either name."""
    model = tiny_llama()
    if cache_kwarg(model) != NEW_NAME:
        pytest.skip("this transformers takes past_key_values only")
    attach(model, config)
    new = cached_greedy(model, PROMPTS[1], 5, NEW_NAME)
    assert cached_greedy(model, PROMPTS[1], 5, OLD_NAME) == new
    assert new == generate_ids(model, NO_STOP, [PROMPTS[1]], max_new_tokens=5)[0]
