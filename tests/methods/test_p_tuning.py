"""P-Tuning: PEFT's PromptEncoder (MLP and LSTM) is the oracle for parameter counts, logits and files; a saved
adapter is the encoder's output and loads as a fixed prompt; cached generation equals recomputation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import fit, train_and_reload
from tuneforge.data.batching import left_pad
from tuneforge.inference.generate import generate_ids
from tuneforge.methods import attach, get_method, load_adapter, method_for_adapter
from tuneforge.methods.adapter_files import TUNEFORGE_ADAPTER_META
from tuneforge.methods.kv_cache import cache_kwarg, output_cache
from tuneforge.methods.p_tuning import PTuning, PTuningConfig

peft = pytest.importorskip("peft")
# Noise from the oracle: PEFT drops position ids of prompt methods, and calls a deprecated transformers API.
pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:Position ids are not supported", "ignore:`is_gradient_checkpointing`")]

N, HIDDEN = 4, 16  # virtual tokens, encoder width


def tiny(arch: str, seed: int = 0):
    """A tiny random model; weights 10x larger than HF's default init so that a prompt visibly steers it."""
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            initializer_range=0.2)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                                      initializer_range=0.2)).eval()


def p_tuned(arch: str, encoder: str):
    model = tiny(arch)
    torch.manual_seed(1)
    handle = attach(model, PTuningConfig(num_virtual_tokens=N, encoder_reparameterization_type=encoder,
                                         encoder_hidden_size=HIDDEN))
    return model, handle


def peft_model(arch: str, encoder: str):
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=HIDDEN,
                                      encoder_reparameterization_type=encoder)
    return peft.get_peft_model(tiny(arch), config).eval()


def batch(rows: int = 2, length: int = 7):
    ids = torch.randint(4, 128, (rows, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, torch.ones_like(ids), labels


@pytest.mark.parametrize("arch,encoder", [("llama", "MLP"), ("gpt2", "MLP"), ("llama", "LSTM"), ("gpt2", "LSTM")])
def test_encoder_logits_and_parameter_count_match_peft(arch, encoder):
    model, handle = p_tuned(arch, encoder)
    reference = peft_model(arch, encoder)
    encoder_module = reference.prompt_encoder["default"]
    # Same layers under the same names: PEFT's encoder takes our weights as they are.
    encoder_module.load_state_dict(handle.prompt.state_dict())
    assert handle.num_trainable_parameters() == reference.get_nb_trainable_parameters()[0]
    ids, mask, labels = batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels)
        theirs = reference(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits[:, N:], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-6)


def test_parameter_counts_follow_peft_formulas():
    d, h = 32, HIDDEN
    mlp = attach(tiny("llama"), PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=h))
    assert mlp.num_trainable_parameters() == N * d + (d * h + h) + (h * h + h) + (h * d + d)
    default_width = attach(tiny("llama"), PTuningConfig(num_virtual_tokens=N))
    assert default_width.adapter_config()["encoder_hidden_size"] == d  # the model's hidden size by default


@pytest.mark.parametrize("arch,encoder", [("llama", "LSTM"), ("gpt2", "MLP")])
def test_saved_encoder_output_loads_in_peft_and_tuneforge(arch, encoder, tmp_path):
    model, handle = p_tuned(arch, encoder)
    handle.save(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(saved["prompt_embeddings"], handle.prompt(), rtol=0, atol=0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["encoder_reparameterization_type"], config["encoder_hidden_size"],
            config["num_virtual_tokens"], config["token_dim"]) == ("P_TUNING", encoder, HIDDEN, N, 32)
    ids, mask, _ = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        reference = peft.PeftModel.from_pretrained(tiny(arch), str(tmp_path)).eval()
        torch.testing.assert_close(reference(input_ids=ids, attention_mask=mask).logits[:, N:], expected,
                                   rtol=0, atol=1e-6)
        fresh = tiny(arch)
        loaded = load_adapter(fresh, tmp_path)
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)
    assert loaded.fixed and loaded.num_trainable_parameters() == 0  # inference: the encoder is not saved
    with pytest.raises(TypeError, match="fixed prompt"):
        handle.load_state_dict(saved)


def test_peft_saved_adapter_loads_in_tuneforge(tmp_path):
    reference = peft_model("llama", "MLP")
    reference.save_pretrained(str(tmp_path))
    assert not (tmp_path / TUNEFORGE_ADAPTER_META).exists()
    assert method_for_adapter(tmp_path) is PTuning
    model = tiny("llama")
    load_adapter(model, tmp_path)
    ids, mask, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits[:, N:], rtol=0, atol=1e-6)


def test_cached_left_padded_generation_equals_recomputation():
    model, handle = p_tuned("llama", "LSTM")
    prompts, steps = [[5, 17, 99], [8, 41, 7, 63, 22, 90, 11], [120, 3, 56, 77, 30]], 5
    ids, mask = left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        next_pos, sequences = positions[:, -1:] + 1, [list(p) for p in prompts]
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1)
            for row, seq in enumerate(sequences):
                recomputed = model(input_ids=torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(out.logits[row, -1], recomputed, rtol=1e-4, atol=1e-5)
                seq.append(int(token[row]))
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                        logits_to_keep=1, **{cache_kwarg(model): output_cache(out)})
            next_pos = next_pos + 1
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    batched = generate_ids(model, tokenizer, prompts, max_new_tokens=steps, batch_size=3)
    assert batched == [seq[len(p):] for seq, p in zip(sequences, prompts)]
    assert batched == [generate_ids(model, tokenizer, [p], max_new_tokens=steps)[0] for p in prompts]


def test_training_moves_only_the_encoder_and_disabling_restores_the_base():
    model, handle = p_tuned("gpt2", "MLP")
    base_model = tiny("gpt2")
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    before = {n: p.detach().clone() for n, p in handle.trainable_parameters()}
    ids, mask, labels = batch(rows=4, length=10)
    losses = fit(model, handle, {"input_ids": ids, "attention_mask": mask, "labels": labels}, steps=8)
    assert losses[-1] < losses[0] - 0.1
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in base.items())
    assert all(not torch.equal(p, before[n]) for n, p in handle.trainable_parameters())  # every encoder tensor trains
    model.eval()
    with torch.no_grad(), handle.disabled():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           base_model(input_ids=ids, attention_mask=mask).logits)


def test_config_options_and_routing():
    from tuneforge.config import load_config

    run = load_config(overrides={"method": "p-tuning", "p_tuning_num_virtual_tokens": 10,
                                 "p_tuning_encoder_reparameterization_type": "lstm",
                                 "p_tuning_encoder_hidden_size": 64})
    config = get_method(run.method).config_class.from_dict(run.method_options)
    assert (config.num_virtual_tokens, config.encoder_reparameterization_type, config.encoder_hidden_size) == (
        10, "LSTM", 64)
    with pytest.raises(ValueError, match="MLP or LSTM"):
        PTuningConfig(encoder_reparameterization_type="GRU")



def test_trains_through_the_trainer_and_reloads(tmp_path, tokenizer, sft_file):
    """Through the trainer, saved, reloaded (as a fixed prompt) with equal logits."""
    result = train_and_reload(tmp_path, tokenizer, sft_file, "p_tuning",
                              {"num_virtual_tokens": 4, "encoder_hidden_size": 16})
    encoder = (32 * 16 + 16) + (16 * 16 + 16) + (16 * 32 + 32)  # the MLP's three linear layers
    assert result.steps == 2 and result.metrics["trainable_params"] == 4 * 32 + encoder
