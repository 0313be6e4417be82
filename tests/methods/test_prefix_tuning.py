"""Prefix Tuning: PEFT parity (parameters, logits, files both ways), the GQA layout, training, generation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version

from tuneforge.config import route_key
from tuneforge.methods import attach, get_method, load_adapter, method_for_adapter
from tuneforge.methods.kv_cache import cache_kwarg, output_cache
from tuneforge.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from tuneforge.models.logprobs import token_cross_entropy_sum

peft = pytest.importorskip("peft")

# PEFT 0.21.2's PeftModelForCausalLM.prepare_inputs_for_generation looks for the KV cache under
# model_kwargs["past_key_values"] only; transformers 5.24's generate hands it over as "cache". PEFT then takes every
# decoding step for the first one and puts a fresh prefix cache under "past_key_values" beside generate's "cache";
# the model's forward keeps "cache" (with a FutureWarning) and drops "past_key_values": the prefix is never used.
PEFT_GENERATE_MISSES_CACHE = pytest.mark.xfail(
    condition=Version(peft.__version__) == Version("0.21.2")
    and Version(transformers.__version__).release >= (5, 24),
    reason="PEFT 0.21.2 reads model_kwargs['past_key_values'] in prepare_inputs_for_generation; transformers 5.24 "
           "passes the cache as 'cache', so PEFT's prefix goes in as a second, ignored past_key_values",
    strict=True)

N = 5  # virtual tokens
VOCAB = 96


def tiny(arch: str, seed: int = 0):
    """Tiny random causal LMs: Llama with grouped-query attention (4 heads, 2 KV heads), GPT-2 (Conv1D, learned
    absolute positions), Qwen2 (GQA, q/k/v biases). No EOS, so generate() always runs to max_new_tokens."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    else:
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def batch(seed: int = 1, b: int = 3, t: int = 7):
    """Left-padded token ids and mask (row 0 has 2 pads, row 2 has 4)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def peft_prefix(base, projection: bool, hidden: int | None = None):
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection,
                                  encoder_hidden_size=hidden)
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


def ours(base, projection: bool = True, hidden: int | None = None):
    model = copy.deepcopy(base)
    handle = attach(model, PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=projection,
                                              encoder_hidden_size=hidden))
    return model, handle


CASES = [("llama", False, None), ("llama", True, None), ("llama", True, 24), ("gpt2", False, None),
         ("gpt2", True, None), ("qwen2", True, None)]


@pytest.mark.parametrize("arch,projection,hidden", CASES)
def test_trainable_parameters_and_logits_match_peft(arch, projection, hidden):
    base = tiny(arch)
    model, handle = ours(base, projection, hidden)
    reference = peft_prefix(base, projection, hidden)
    assert (handle.num_trainable_parameters(), handle.num_total_parameters()) == \
        reference.get_nb_trainable_parameters()
    # Same prefix parameters (PEFT's module names are ours) -> same logits, over the real tokens only.
    reference.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
    ids, mask = batch()
    got, want = logits(model, ids, mask), logits(reference, ids, mask)
    assert got.shape == (*ids.shape, VOCAB) == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - logits(base, ids, mask)).abs().max() > 1e-2  # the prefix changes the model


def test_gqa_prefix_layout_is_peft_s():
    """Under GQA the prefix is sized by KV heads x head_dim and laid out [layer, key|value, kv_head, head_dim]."""
    model, handle = ours(tiny("llama"), projection=False)
    config = handle.adapter_config()
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (16, 2, 2)
    flat = handle.state_dict()["prompt_embeddings"]
    assert flat.shape == (N, 2 * 2 * 16)
    cache = handle.injector.prefix_cache(batch_size=3)
    per_layer = flat.view(N, 2, 2, 2, 8)  # [N, layer, key|value, kv_head, head_dim]
    for layer in range(2):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        assert keys.shape == (3, 2, N, 8)
        torch.testing.assert_close(keys[1], per_layer[:, layer, 0].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(values[2], per_layer[:, layer, 1].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("arch,projection", [("llama", True), ("gpt2", False), ("gpt2", True)])
def test_peft_loads_our_files(tmp_path, arch, projection):
    base = tiny(arch)
    model, handle = ours(base, projection)
    handle.save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["prefix_projection"] is projection
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids, mask = batch()
    torch.testing.assert_close(logits(reference, ids, mask), logits(model, ids, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,projection", [("llama", True), ("llama", False), ("gpt2", True)])
def test_we_load_peft_files(tmp_path, arch, projection):
    base = tiny(arch)
    torch.manual_seed(3)
    reference = peft_prefix(base, projection)
    reference.save_pretrained(tmp_path)
    assert method_for_adapter(tmp_path) is PrefixTuning
    model = copy.deepcopy(base)
    handle = load_adapter(model, tmp_path)
    ids, mask = batch()
    torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask), rtol=0, atol=1e-5)
    # The MLP cannot be recovered from its saved output: the loaded prefix is trained directly.
    assert handle.num_trainable_parameters() == N * 2 * 2 * (16 if arch == "llama" else 32)


def test_tuneforge_round_trip(tmp_path):
    base = tiny("llama")
    model, handle = ours(base)
    handle.save(tmp_path)
    meta = json.loads((tmp_path / "tuneforge_adapter.json").read_text())
    assert meta["method"] == "prefix_tuning" and meta["options"]["num_virtual_tokens"] == N
    loaded = copy.deepcopy(base)
    load_adapter(loaded, tmp_path)
    ids, mask = batch()
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), rtol=0, atol=1e-6)


def test_load_rejects_a_prefix_for_another_model(tmp_path):
    _, handle = ours(tiny("llama"))
    handle.save(tmp_path)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(tiny("gpt2"), tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disabled_is_the_base_model_exactly(arch):
    base = tiny(arch)
    model, handle = ours(base)
    ids, mask = batch()
    with handle.disabled():
        assert torch.equal(logits(model, ids, mask), logits(base, ids, mask))
    assert not torch.equal(logits(model, ids, mask), logits(base, ids, mask))


def test_callers_see_real_tokens_only():
    model, _ = ours(tiny("llama"))
    ids, mask = batch()
    full = logits(model, ids, mask)
    # A boolean logits_to_keep mask selects real positions (as the objectives call it).
    keep = mask.bool().clone()
    keep[:, -1] = False
    with torch.no_grad():
        kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    torch.testing.assert_close(kept, full[keep], rtol=0, atol=1e-6)
    # labels align with input_ids; the model's loss is over real tokens.
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    want = F.cross_entropy(full[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want)
    # Real-token position ids start at 0 for the caller; the prefix takes positions 0..N-1 inside (as PEFT).
    with torch.no_grad():
        explicit = model(input_ids=ids[1:2], position_ids=torch.arange(7)[None]).logits
    torch.testing.assert_close(explicit, logits(model, ids[1:2], None), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_reduces_loss_and_keeps_base_bit_identical(arch):
    model, handle = ours(tiny(arch))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("prefix_encoder.")}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5)).repeat(4, 1)  # one sequence
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss_sum, count = token_cross_entropy_sum(model, data)  # logits_to_keep mask, as the trainer's objectives
        loss = loss_sum / count
        optimizer.zero_grad()
        loss.backward()
        # A fresh prefix cache per forward: every step's graph reaches the encoder.
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in handle.trainable_parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_gradient_checkpointing_is_refused_in_training():
    model, _ = ours(tiny("llama"))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    ids, mask = batch()
    logits(model, ids, mask)  # eval mode: transformers does not checkpoint, the prefix stays
    model.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(input_ids=ids, attention_mask=mask)


# -- generation ---------------------------------------------------------------------------------------------


def cached_greedy(model, ids, mask, new_tokens: int):
    """tuneforge.inference.generate's loop: left-padded prefill, then one token per step with the returned cache."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    tokens = []
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_kwarg(model): output_cache(out)})
    return torch.stack(tokens, dim=1)


def recomputed_greedy(model, ids, mask, new_tokens: int):
    """The same greedy decode without a cache: the whole sequence every step."""
    tokens = []
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1)
        tokens.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_cached_generation_matches_recompute_and_unpadded(arch):
    model, _ = ours(tiny(arch))
    ids, mask = batch()
    cached = cached_greedy(model, ids, mask, 8)
    assert torch.equal(cached, recomputed_greedy(model, ids, mask, 8))
    one_by_one = [cached_greedy(model, ids[i:i + 1, mask[i].bool()], mask[i:i + 1, mask[i].bool()], 8)
                  for i in range(len(ids))]
    assert torch.equal(cached, torch.cat(one_by_one))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_hf_generate_matches_our_loop(arch):
    """HF generate through the hook == our cached loop == recomputation without a cache."""
    model, _ = ours(tiny(arch))
    ids, mask = batch()
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(hf, cached_greedy(model, ids, mask, 8))
    assert torch.equal(hf, recomputed_greedy(model, ids, mask, 8))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@PEFT_GENERATE_MISSES_CACHE
@torch.no_grad()
def test_hf_generate_matches_peft(arch):
    base = tiny(arch)
    model, handle = ours(base)
    reference = peft_prefix(base, projection=True)
    reference.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
    ids, mask = batch()
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    peft_tokens = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(hf, peft_tokens[:, ids.shape[1]:])


# -- registration and options -------------------------------------------------------------------------------


def test_registered_with_aliases_and_validated_options():
    assert get_method("prefix-tuning") is PrefixTuning and get_method("Prefix_Tuning") is PrefixTuning
    out: dict = {}
    route_key("prefix-num-virtual-tokens", 7, out)
    route_key("prefix_projection", False, out)
    config = PrefixTuningConfig.from_dict(out["method_options"])
    assert (config.num_virtual_tokens, config.prefix_projection) == (7, False)
    with pytest.raises(ValueError, match="unknown option"):
        PrefixTuningConfig.from_dict({"r": 8})
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=0)
