"""tuneforge's generation loop: the KV-cached loop equals recomputing without a cache, batching with left padding
equals one prompt at a time, sampling is reproducible with a seed, and generation stops at EOS."""

from __future__ import annotations

import copy

import pytest
import torch

import tuneforge
from conftest import make_tiny_model
from tuneforge.data.template import ensure_chat_template
from tuneforge.inference.generate import generate, generate_ids

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 4, 200, 201, 202, 150], [100], [33, 34, 35, 36, 37, 38]]


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    ensure_chat_template(tok)
    return tok


def no_stop_model(arch, tokenizer):
    """A tiny model whose EOS logit is pushed down, so greedy runs always reach max_new_tokens."""
    model = make_tiny_model(arch, len(tokenizer))
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([tokenizer.eos_token_id]), -1e4))
    return model


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_cached_generation_equals_recomputation(arch, tokenizer):
    model = no_stop_model(arch, tokenizer)
    outs = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    for prompt, out in zip(PROMPTS, outs):
        assert len(out) == 12
        assert out == greedy_without_cache(model, prompt, 12)


def test_left_padded_batch_equals_one_by_one(arch, tokenizer):
    model = no_stop_model(arch, tokenizer)
    one_by_one = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=1)
    batched = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4)
    assert batched == one_by_one
    # Results come back in the caller's order although prompts are batched by length.
    assert generate_ids(model, tokenizer, PROMPTS[::-1], max_new_tokens=10, batch_size=4) == one_by_one[::-1]


def test_generation_through_lora(tokenizer):
    model = no_stop_model("llama", tokenizer)
    tuneforge.attach(model, tuneforge.LoRAConfig(r=4, init_lora_weights=False))
    outs = generate_ids(model, tokenizer, PROMPTS[:2], max_new_tokens=8, batch_size=2)
    assert outs == [greedy_without_cache(model, p, 8) for p in PROMPTS[:2]]


def test_sampling_is_reproducible_with_a_seed(tokenizer):
    model = no_stop_model("llama", tokenizer)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.0, batch_size=4)
    first = generate_ids(model, tokenizer, PROMPTS, seed=123, **kwargs)
    assert generate_ids(model, tokenizer, PROMPTS, seed=123, **kwargs) == first
    assert generate_ids(model, tokenizer, PROMPTS, seed=7, **kwargs) != first
    greedy = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=16)
    assert first != greedy  # a random tiny model's distribution is nearly flat: sampling departs from argmax
    # top_k=1 is greedy whatever the seed.
    assert generate_ids(model, tokenizer, PROMPTS, seed=5, top_k=1, **kwargs) == greedy


def test_stops_at_eos(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    eos = tokenizer.eos_token_id
    calls = {"n": 0}

    def force_eos_late(module, inputs, out):
        # Row 0 gets EOS as its 3rd new token; row 1 never does.
        calls["n"] += 1
        out = out.index_fill(-1, torch.tensor([eos]), -1e4)
        if calls["n"] >= 3:
            out[0, :, eos] = 1e4
        return out

    model.lm_head.register_forward_hook(force_eos_late)
    outs = generate_ids(model, tokenizer, [[40, 41, 42], [50, 51, 52]], max_new_tokens=9, batch_size=2)
    assert len(outs[0]) == 2 and eos not in outs[0]  # cut before the stop token
    assert len(outs[1]) == 9
    # Once every row has stopped the loop ends without running to max_new_tokens.
    calls["n"] = 0
    outs = generate_ids(model, tokenizer, [[40, 41, 42]], max_new_tokens=50, batch_size=1)
    assert len(outs[0]) == 2 and calls["n"] == 3
    # In a distributed run another rank may still be generating: this one keeps stepping (FSDP's forwards pair up
    # across ranks) until every rank is done, and its finished row stays cut at its stop token.
    calls["n"] = 0
    asked = []
    still = lambda running: asked.append(running) or len(asked) < 6  # noqa: E731  (the other rank: 6 steps)
    outs = generate_ids(model, tokenizer, [[40, 41, 42]], max_new_tokens=50, batch_size=1, any_running=still)
    assert len(outs[0]) == 2 and calls["n"] == 6
    assert asked[:3] == [True, True, False]  # this rank's own state, reported each step


def test_generation_config_eos_also_stops(tokenizer):
    model = no_stop_model("llama", tokenizer)
    (free,) = generate_ids(model, tokenizer, [PROMPTS[1]], max_new_tokens=10)
    k = next(i for i in range(1, 10) if free[i] not in free[:i])
    model.generation_config.eos_token_id = free[k]
    assert generate_ids(model, tokenizer, [PROMPTS[1]], max_new_tokens=10) == [free[:k]]


def test_generate_strings_apply_the_chat_template(chat_tokenizer):
    model = no_stop_model("llama", chat_tokenizer)
    texts = generate(model, chat_tokenizer, ["Hello!", [{"role": "user", "content": "Hello!"}]], max_new_tokens=6)
    assert isinstance(texts[0], str) and texts[0] == texts[1]
    ids = chat_tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=False,
                                             add_generation_prompt=True)
    ids = chat_tokenizer(ids, add_special_tokens=False)["input_ids"]
    expected = chat_tokenizer.decode(greedy_without_cache(model, ids, 6), skip_special_tokens=True).strip()
    assert texts[0] == expected
    assert not model.training  # eval mode during generation, restored after
    model.train()
    generate(model, chat_tokenizer, ["Hi"], max_new_tokens=2)
    assert model.training


def test_long_prompts_come_in_smaller_batches():
    from tuneforge.inference.generate import length_batches

    order = [3, 0, 2, 1]  # sorted by length: 10, 10, 50, 90 tokens (prompt + new tokens)
    assert length_batches(order, [10, 10, 50, 90], max_rows=64, max_tokens=None) == [[3, 0, 2, 1]]
    assert length_batches(order, [10, 10, 50, 90], max_rows=2, max_tokens=None) == [[3, 0], [2, 1]]
    # 3 rows x 50 = 150 > 100: the third opens a batch; 90 x 2 > 100 too.
    assert length_batches(order, [10, 10, 50, 90], max_rows=64, max_tokens=100) == [[3, 0], [2], [1]]
