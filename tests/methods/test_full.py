"""Full fine-tuning: every weight trains, and the result is a plain Hugging Face model directory that reloads
with identical logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tuneforge
from conftest import make_tiny_model
from tuneforge.methods.base import count_parameters
from tuneforge.methods.full import FullConfig

pytestmark = pytest.mark.usefixtures("single_thread")


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


def adamw_steps(model, handle, ids, n=3, lr=1e-2):
    opt = torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=lr)
    model.train()
    losses = []
    for _ in range(n):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_everything_trains_and_reloads(arch, tokenizer, tmp_path):
    model = make_tiny_model(arch, len(tokenizer))
    base = copy.deepcopy(model)
    handle = tuneforge.attach(model, FullConfig())
    assert handle.num_trainable_parameters() == count_parameters(model) == handle.num_total_parameters()
    ids = torch.randint(4, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    model, losses = adamw_steps(model, handle, ids)
    assert losses[-1] < losses[0]
    trained = logits(model, ids)
    assert not torch.allclose(trained, logits(base, ids))
    with pytest.raises(RuntimeError, match="reference model"):
        with handle.disabled():
            pass

    handle.save(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), trained)


def test_frozen_embeddings_option(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    handle = tuneforge.attach(model, FullConfig(train_embeddings=False))
    trainable = {n for n, _ in handle.trainable_parameters()}
    assert "model.embed_tokens.weight" not in trainable and "lm_head.weight" not in trainable
    assert "model.layers.0.self_attn.q_proj.weight" in trainable
    embeddings = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert handle.num_trainable_parameters() == count_parameters(model) - embeddings


def test_trainer_writes_a_loadable_model_directory(tmp_path, tokenizer, sft_file):
    cfg = tuneforge.load_config(None, dict(data=str(sft_file), output=str(tmp_path / "run"), method="full",
                                           max_steps=3, batch_size=4, learning_rate=1e-3, progress=False))
    model = make_tiny_model("gpt2", len(tokenizer))  # tied input / output embeddings
    base = copy.deepcopy(model)
    result = tuneforge.train(cfg, model, copy.deepcopy(tokenizer))
    run = tmp_path / "run"
    assert (run / "tuneforge.yaml").is_file() and (run / "metrics.jsonl").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(run).eval()
    ids = torch.randint(4, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(reloaded, ids), logits(result.model.eval(), ids))
    assert not torch.allclose(logits(reloaded, ids), logits(base, ids))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # still tied
    # The tokenizer travels with the model, with the chat template the run trained on.
    tok = AutoTokenizer.from_pretrained(run)
    assert tok.chat_template == result.tokenizer.chat_template and tok.chat_template
