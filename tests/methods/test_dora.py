"""DoRA (``use_dora``): the layer starts at the base model, PEFT loads our files with the same logits and we load
PEFT's (``lora_magnitude_vector`` keys, ``use_dora`` in adapter_config.json), the gradient flows to the magnitude,
merge / unmerge / disable work, and QLoRA + DoRA matches PEFT on the same 4-bit base (magnitude from the
de-quantised weight) and merges to 16 bits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import tuneforge
from conftest import make_tiny_model
from tuneforge.methods.lora import LoRAConfig

pytestmark = pytest.mark.usefixtures("single_thread")
peft = pytest.importorskip("peft")


def tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


def trained(handle, seed: int = 0) -> None:
    """Move every trainable tensor (A, B and the magnitude) as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in handle.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_our_dora_adapter(arch, tokenizer, tmp_path):
    vocab = len(tokenizer)
    model = make_tiny_model(arch, vocab)
    base = logits(model, tokens(vocab))
    handle = tuneforge.attach(model, LoRAConfig(r=4, use_dora=True))
    torch.testing.assert_close(logits(model, tokens(vocab)), base)  # B = 0 and m = ‖W‖: the base model
    trained(handle)
    handle.save(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith(".lora_magnitude_vector") for k in f.keys())
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    ours = logits(model.eval(), tokens(vocab))
    loaded = peft.PeftModel.from_pretrained(make_tiny_model(arch, vocab), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, tokens(vocab)), ours, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-3
    fresh = peft.get_peft_model(make_tiny_model(arch, vocab),
                                peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert handle.num_trainable_parameters() == fresh.get_nb_trainable_parameters()[0]


def test_we_load_peft_dora_adapter_and_merge(tokenizer, tmp_path):
    vocab = len(tokenizer)
    pm = peft.get_peft_model(make_tiny_model("llama", vocab),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                             init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.1)
    pm.save_pretrained(str(tmp_path))
    theirs = logits(pm.eval(), tokens(vocab))
    model = make_tiny_model("llama", vocab)
    handle = tuneforge.load_adapter(model, tmp_path)
    assert handle.config.use_dora
    torch.testing.assert_close(logits(model, tokens(vocab)), theirs, atol=1e-5, rtol=1e-5)

    handle.merge()
    torch.testing.assert_close(logits(model, tokens(vocab)), theirs, atol=1e-5, rtol=1e-5)
    handle.unmerge()
    with handle.disabled():
        torch.testing.assert_close(logits(model, tokens(vocab)), logits(make_tiny_model("llama", vocab),
                                                                        tokens(vocab)))
    plain = handle.merge_and_unload()
    torch.testing.assert_close(logits(plain, tokens(vocab)), theirs, atol=1e-5, rtol=1e-5)
    peft_merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(peft_merged, tokens(vocab)), theirs, atol=1e-5, rtol=1e-5)


def test_magnitude_trains_and_norm_is_detached(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    handle = tuneforge.attach(model, LoRAConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    model(input_ids=tokens(len(tokenizer))).logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in handle.trainable_parameters()}
    assert any("lora_magnitude_vector" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert all(g is not None for n, g in grads.items() if "lora_A" in n)


def test_qlora_with_dora_matches_peft_and_merges(tokenizer, tmp_path):
    from tuneforge.methods.qlora import QLoRAConfig, merge_to_16bit, quantize_model_

    vocab = len(tokenizer)
    config = QLoRAConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    model = make_tiny_model("llama", vocab)
    handle = tuneforge.attach(model, config)
    trained(handle)
    twin = make_tiny_model("llama", vocab)
    quantize_model_(twin, config)
    oracle = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       use_dora=True)).eval()
    peft.set_peft_model_state_dict(oracle, handle.state_dict())
    x = tokens(vocab)
    ours = logits(model.eval(), x)
    torch.testing.assert_close(ours, logits(oracle, x), atol=1e-5, rtol=1e-5)
    merged = merge_to_16bit(handle, torch.float32)
    torch.testing.assert_close(logits(merged, x), ours, atol=1e-4, rtol=1e-4)
