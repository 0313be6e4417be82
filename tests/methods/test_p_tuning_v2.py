"""P-Tuning v2: its own method name and defaults on Prefix Tuning's machinery; PEFT PREFIX_TUNING files both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tuneforge.methods import attach, get_method, load_adapter, method_for_adapter
from tuneforge.methods.p_tuning_v2 import PTuningV2, PTuningV2Config
from tuneforge.methods.prefix_tuning import PrefixTuning

peft = pytest.importorskip("peft")

N = 6
VOCAB = 96


def tiny(arch: str):
    """Llama with grouped-query attention (KV width 16) or GPT-2 (Conv1D; KV width 32)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    common = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, **common)
    else:
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def inputs():
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logits(model):
    ids, mask = inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def peft_model(base, projection: bool):
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection)
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


def test_registered_under_its_own_name_with_p_tuning_v2_defaults():
    assert get_method("p-tuning-v2") is PTuningV2 and get_method("ptuning_v2") is PTuningV2
    assert PTuningV2 is not PrefixTuning and issubclass(PTuningV2, PrefixTuning)
    config = PTuningV2Config.from_dict({"num_virtual_tokens": N})
    assert config.prefix_projection is False and type(config).method == "p_tuning_v2"


@pytest.mark.parametrize("arch,kv_width", [("llama", 16), ("gpt2", 32)])
@pytest.mark.parametrize("projection", [False, True])
def test_trainable_parameters_match_peft(arch, kv_width, projection):
    base = tiny(arch)
    model = copy.deepcopy(base)
    handle = attach(model, PTuningV2Config(num_virtual_tokens=N, prefix_projection=projection))
    assert handle.num_trainable_parameters() == peft_model(base, projection).get_nb_trainable_parameters()[0]
    if not projection:  # the deep prompt itself: N x layers x (key, value) x KV width
        assert handle.num_trainable_parameters() == N * 2 * 2 * kv_width


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_as_peft_prefix_tuning_and_loaded_by_peft(tmp_path, arch):
    base = tiny(arch)
    model = copy.deepcopy(base)
    attach(model, PTuningV2Config(num_virtual_tokens=N)).save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["prefix_projection"]) == ("PREFIX_TUNING", False)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(reference), logits(model), rtol=0, atol=1e-5)
    # tuneforge's own record brings the files back as P-Tuning v2, with the same logits.
    assert method_for_adapter(tmp_path) is PTuningV2
    reloaded = copy.deepcopy(base)
    handle = load_adapter(reloaded, tmp_path)
    assert isinstance(handle.config, PTuningV2Config)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-6)


def test_loads_peft_saved_prefix(tmp_path):
    base = tiny("llama")
    torch.manual_seed(2)
    reference = peft_model(base, projection=False)
    reference.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    PTuningV2.load(model, tmp_path)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trains_the_deep_prompt_only_and_disables_exactly(arch):
    base = tiny(arch)
    model = copy.deepcopy(base)
    handle = attach(model, PTuningV2Config(num_virtual_tokens=N))
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4)).repeat(3, 1)
    optimizer = torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=5e-2)  # P-Tuning v2's large LR
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.9 * losses[0]
    base_params = dict(base.named_parameters())
    assert all(torch.equal(p, base_params[n]) for n, p in model.named_parameters() if not n.startswith("prefix_"))
    with handle.disabled():
        assert torch.equal(logits(model), logits(base))


def test_prefix_init_defaults_resolve_per_method():
    from tuneforge.methods.prefix_tuning import PrefixTuningConfig

    assert PTuningV2Config(num_virtual_tokens=N).prefix_init == "vocab"
    assert PTuningV2Config(num_virtual_tokens=N, prefix_projection=True).prefix_init == "random"  # MLP output
    assert PrefixTuningConfig(num_virtual_tokens=N).prefix_init == "random"  # PEFT's, for Prefix Tuning
    with pytest.raises(ValueError, match="prefix_projection false"):
        PrefixTuningConfig(num_virtual_tokens=N, prefix_init="vocab")
    with pytest.raises(ValueError, match="random or vocab"):
        PTuningV2Config(num_virtual_tokens=N, prefix_init="text")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vocab_init_prefix_is_the_models_own_cache_of_real_tokens(arch):
    """The vocab-initialised prefix is the model's own keys/values for N tokens: at step 0 the model with the prefix
    gives exactly the logits of the base model reading those N tokens first."""
    base = tiny(arch)
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    tokens = torch.randint(0, VOCAB, (1, N))
    torch.manual_seed(3)  # attach draws the same N tokens
    attach(model, PTuningV2Config(num_virtual_tokens=N))
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        expected = base(input_ids=torch.cat([tokens.repeat(2, 1), ids], dim=1)).logits[:, N:]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    random_init = copy.deepcopy(base)
    attach(random_init, PTuningV2Config(num_virtual_tokens=N, prefix_init="random"))
    with torch.no_grad():  # and the N(0, 1) prefix is far from it: the test can fail
        assert (random_init(input_ids=ids).logits - expected).abs().max() > 1e-2
