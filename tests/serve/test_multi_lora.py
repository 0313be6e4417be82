"""Per-row LoRA selection: one forward over rows for different adapters (and the base) gives each row the logits
of that adapter attached alone with tuneforge's LoRA layer, on every tiny architecture (GPT-2's Conv1D too)."""

from __future__ import annotations

import copy

import pytest
import torch

import tuneforge as tf
from tuneforge.methods import load_adapter
from tuneforge.inference.multi_lora import MultiLoRA, read_lora_factors


def test_mixed_rows_equal_each_adapter_alone(tiny_model, tmp_path, arch):
    targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["k_proj", "down_proj"]}[arch]
    configs = {"a": tf.LoRAConfig(r=8, target_modules="all-linear", init_lora_weights=False),
               "b": tf.LoRAConfig(r=2, lora_alpha=5, target_modules=targets, use_rslora=True, init_lora_weights=False)}
    dirs = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(i)
        dirs[name] = tf.attach(copy.deepcopy(tiny_model), config).save(tmp_path / name)
    ids = torch.randint(5, 300, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    expected = {}
    for name in ["a", "b", None]:
        model = copy.deepcopy(tiny_model)
        if name:
            load_adapter(model, dirs[name])
        with torch.no_grad():
            expected[name] = model(input_ids=ids, attention_mask=mask).logits
    multi = MultiLoRA(tiny_model)
    for name, path in dirs.items():
        multi.add(name, read_lora_factors(path, tiny_model))
    rows = ["b", "a", None, "a"]
    with torch.no_grad(), multi.rows(rows):
        got = tiny_model(input_ids=ids, attention_mask=mask).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], expected[name][i], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # outside rows(): the plain base
        assert torch.equal(tiny_model(input_ids=ids, attention_mask=mask).logits, expected[None])
    multi.remove("a")
    with torch.no_grad(), multi.rows(["b"] * 4):
        torch.testing.assert_close(tiny_model(input_ids=ids, attention_mask=mask).logits, expected["b"],
                                   rtol=1e-5, atol=1e-5)


def test_factors_that_do_not_fit_the_base_are_refused(tiny_model, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    handle = tf.attach(copy.deepcopy(tiny_model), tf.LoRAConfig(r=4, init_lora_weights=False))
    path = handle.save(tmp_path / "a")
    other = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), hidden_size=48,
                                                         intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises((KeyError, ValueError), match=str(path)):
        read_lora_factors(path, other)
