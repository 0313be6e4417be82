"""PiSSA / OLoRA initialisation (``init_lora_weights: pissa | olora``, ``--lora-init``): the factors and the residual
base weight equal PEFT's, the layer starts at the base model, PEFT loads our files with the same logits (it
decomposes the base again on loading, as we do) and we load PEFT's, ``disabled()`` is still the untouched base,
merge folds the update into the residual, and removing the adapter restores the original weights."""

from __future__ import annotations

import json

import pytest
import torch

import tuneforge
from conftest import make_tiny_model
from tuneforge.methods.lora import LoRAConfig

pytestmark = pytest.mark.usefixtures("single_thread")
peft = pytest.importorskip("peft")
INITS = ["pissa", "olora"]


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("init", INITS)
def test_factors_and_residual_equal_peft(init, tokenizer):
    vocab = len(tokenizer)
    model = make_tiny_model("llama", vocab)
    base = logits(model, tokens(vocab))
    tuneforge.attach(model, LoRAConfig.from_dict({"r": 4, "lora_alpha": 8, "init": init}))
    pm = peft.get_peft_model(make_tiny_model("llama", vocab),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init))
    theirs = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in pm.state_dict().items()}
    ours = model.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:  # lora_A, lora_B and the residual base weights
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, tokens(vocab)), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_files_both_ways_disable_merge_and_remove(init, tokenizer, tmp_path):
    vocab = len(tokenizer)
    original = make_tiny_model("llama", vocab)
    model = make_tiny_model("llama", vocab)
    handle = tuneforge.attach(model, LoRAConfig(r=4, lora_alpha=8, init_lora_weights=init))
    with torch.no_grad():  # training moves the factors away from the decomposition
        for _, p in handle.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    handle.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == init
    x = tokens(vocab)
    ours = logits(model.eval(), x)
    assert (ours - logits(original, x)).abs().max() > 1e-3

    loaded = peft.PeftModel.from_pretrained(make_tiny_model("llama", vocab), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(loaded, x), ours, atol=1e-5, rtol=1e-5)
    loaded.save_pretrained(str(tmp_path / "theirs"))
    fresh = make_tiny_model("llama", vocab)
    tuneforge.load_adapter(fresh, tmp_path / "theirs")
    torch.testing.assert_close(logits(fresh, x), ours, atol=1e-5, rtol=1e-5)

    with handle.disabled():  # the reference (DPO, PPO) is the original model, not the residual
        torch.testing.assert_close(logits(model, x), logits(original, x), atol=1e-5, rtol=1e-5)
    handle.merge()
    torch.testing.assert_close(logits(model, x), ours, atol=1e-5, rtol=1e-5)
    handle.unmerge()
    plain = handle.remove()  # unmerged removal: the original weights are back
    for k, v in original.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v, atol=1e-5, rtol=1e-5)


def test_quantised_base_is_refused(tokenizer):
    from tuneforge.methods.qlora import QLoRAConfig

    with pytest.raises(ValueError, match="needs a float base weight"):
        tuneforge.attach(make_tiny_model("llama", len(tokenizer)), QLoRAConfig(r=4, init_lora_weights="pissa"))
