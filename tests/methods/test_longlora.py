"""LongLoRA: S²-Attn equals attention under the explicit shifted-group mask (and is causal: no wrap-around), runs only
while training, embeddings and norms train beside the factors, PEFT loads the files (modules_to_save) to the same
logits, and a run trained from the CLI loads back and merges to the same logits."""

from __future__ import annotations

import math

import pytest
import torch

import tuneforge
from tuneforge.inference.loading import load_for_inference
from tuneforge.methods.longlora import LongLoRAConfig, group_spans, set_attention, shifted_sparse_attention

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def masked_attention(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def s2_mask(length: int, group: int, shift: int) -> torch.Tensor:
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return (j <= i) & ((i + shift) // group == (j + shift) // group)


@pytest.mark.parametrize("length", [16, 19])
def test_s2_attention_equals_the_shifted_group_mask(length):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, length, 8) for _ in range(3))
    out = shifted_sparse_attention(q, k, v, ratio=0.25)
    group = math.ceil(0.25 * length)
    # The paper's pattern: heads 0-1 in groups [0, g), [g, 2g) ...; heads 2-3 shifted by g/2 (first group g/2 long).
    expected = torch.cat([masked_attention(q[:, :2], k[:, :2], v[:, :2], s2_mask(length, group, 0)),
                          masked_attention(q[:, 2:], k[:, 2:], v[:, 2:], s2_mask(length, group, group - group // 2))],
                         dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_s2_attention_never_looks_ahead():
    """The reference implementation rolls the shifted heads, so its first tokens see the last ones; ours is causal."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16, 8) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1], v2[:, :, -1] = 5.0, 5.0
    a, b = shifted_sparse_attention(q, k, v, 0.25), shifted_sparse_attention(q, k2, v2, 0.25)
    torch.testing.assert_close(a[:, :, :-1], b[:, :, :-1])


def test_group_spans():
    assert group_spans(16, 4, 0) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert group_spans(16, 4, 2) == [(0, 2), (2, 6), (6, 10), (10, 14), (14, 16)]


def perturbed_longlora(arch: str, vocab: int):
    model = make_tiny_model(arch, vocab)
    handle = tuneforge.attach(model, LongLoRAConfig(r=4, init_lora_weights=False, group_size_ratio=0.25))
    with torch.no_grad():  # as if trained: embeddings and norms moved
        for _, p in handle.whole_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, handle


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_s2_only_while_training_and_what_trains(arch, tokenizer):
    model, handle = perturbed_longlora(arch, len(tokenizer))
    trained = {n for n, _ in handle.trainable_parameters()}
    assert "model.embed_tokens.weight" in trained and "model.norm.weight" in trained
    assert "model.layers.1.post_attention_layernorm.weight" in trained
    assert any(".lora_A." in n for n in trained) and not any("base_layer" in n for n in trained)
    ids = torch.randint(4, len(tokenizer), (1, 32))
    with torch.no_grad():
        model.eval()
        full_eval = model(input_ids=ids).logits
        model.train()
        s2_train = model(input_ids=ids).logits
        set_attention(model, "sdpa")  # the same weights under plain attention: what full attention computes
        model.eval()
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(full_eval, plain)
    assert not torch.allclose(s2_train[:, 8:], plain[:, 8:], atol=1e-4)  # past the first group S2-Attn differs
    torch.testing.assert_close(s2_train[:, :4], plain[:, :4])  # the first half-group sees what full attention sees


def test_disabled_is_the_base_model(tokenizer):
    base = make_tiny_model("llama", len(tokenizer))
    model, handle = perturbed_longlora("llama", len(tokenizer))
    ids = torch.randint(4, len(tokenizer), (1, 24))
    with torch.no_grad(), handle.disabled():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, base(input_ids=ids).logits)


def test_peft_loads_longlora_files(tokenizer, tmp_path):
    """PEFT is the oracle for the files: LoRA factors plus embeddings and norms under modules_to_save."""
    from peft import PeftModel

    model, handle = perturbed_longlora("llama", len(tokenizer))
    handle.save(tmp_path / "adapter")
    ids = torch.randint(4, len(tokenizer), (2, 20))
    peft_model = PeftModel.from_pretrained(make_tiny_model("llama", len(tokenizer)), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_trained_from_the_cli_loads_back_and_merges(tiny_model_dir, tmp_path, sft_file):
    from tuneforge.commands.main import main

    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(sft_file), "--output", str(run),
                 "--method", "longlora", "--lora-r", "4", "--longlora-group-size-ratio", "0.5", "--max-steps", "2",
                 "--batch-size", "4", "--max-length", "64", "--learning-rate", "1e-2", "--progress", "false",
                 "--eval-generate", "false", "--general-eval", "none", "--device", "cpu"]) == 0
    model, _, handle = load_for_inference(str(tiny_model_dir), run, device="cpu")
    assert type(handle.config) is LongLoRAConfig and handle.config.group_size_ratio == 0.5
    base = make_tiny_model("llama", len(tokenizer_of(tiny_model_dir)))
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # the trained copy
    ids = torch.randint(4, 300, (1, 24))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert main(["merge", str(run), "--output", str(tmp_path / "merged"), "--device", "cpu"]) == 0
    merged, _, none = load_for_inference(str(tmp_path / "merged"), None, device="cpu")
    assert none is None and merged.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def tokenizer_of(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
