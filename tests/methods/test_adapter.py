"""Bottleneck adapters: found generically (Llama, GPT-2, OPT), start at the base model, train alone, disable to
the exact base, and reload exactly from tuneforge's own PEFT-style files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from conftest import fit, train_and_reload
from tuneforge.methods import attach, get_method, load_adapter, method_for_adapter
from tuneforge.methods.adapter_files import TUNEFORGE_ADAPTER_META
from tuneforge.methods.adapter import Adapter, AdapterConfig, BottleneckAdapter

pytestmark = pytest.mark.usefixtures("single_thread")

D, LAYERS = 32, 2
ARCHS = ["llama", "gpt2", "opt"]
# Where the adapters must sit: (feed-forward sub-module, attention sub-module) of block 0.
SITES = {"llama": ("model.layers.0", "mlp", "self_attn"), "gpt2": ("transformer.h.0", "mlp", "attn"),
         "opt": ("model.decoder.layers.0", "fc2", "self_attn")}
NORMS_PER_BLOCK = {"llama": 2 * D, "gpt2": 2 * 2 * D, "opt": 2 * 2 * D}  # RMSNorm weight; LayerNorm weight+bias


def tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=D, intermediate_size=64,
                                             num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                             initializer_range=0.2))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=D, n_layer=LAYERS, n_head=4, bos_token_id=1,
                                           eos_token_id=2, initializer_range=0.2))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=D, ffn_dim=64, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, word_embed_proj_dim=D, max_position_embeddings=64,
                                         pad_token_id=0, init_std=0.2))
    return model.to(dtype).eval()


def inputs(rows: int = 2, length: int = 7):
    ids = torch.randint(4, 128, (rows, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def logits(model, batch=None) -> torch.Tensor:
    batch = batch or inputs()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def perturb(handle, scale: float = 0.3) -> None:
    """Random values in every trainable tensor, so the adapter changes the outputs."""
    torch.manual_seed(5)
    with torch.no_grad():
        for _, p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_adapters_sit_where_the_placement_says_and_start_at_the_base(arch, placement):
    model = tiny(arch)
    handle = attach(model, AdapterConfig(placement=placement, reduction_factor=4))
    block, ffn, attention = SITES[arch]
    expected = {f"{block}.output_adapter": f"{block}.{ffn}"}
    if placement == "houlsby":
        expected[f"{block}.attention_adapter"] = f"{block}.{attention}"
    assert {a: s for a, s in handle.hooked.items() if a.startswith(block + ".")} == expected
    assert len(handle.hooked) == LAYERS * len(expected)
    m = D // 4
    assert handle.num_trainable_parameters() == len(handle.hooked) * (2 * D * m + m + D)
    assert torch.equal(logits(model), logits(tiny(arch)))  # up-projections start at zero


@pytest.mark.parametrize("arch", ARCHS)
def test_houlsby_adapts_the_attention_output(arch):
    model = tiny(arch)
    handle = attach(model, AdapterConfig(placement="houlsby", bottleneck_size=3))
    base = logits(model)
    attention_up = model.get_submodule(f"{SITES[arch][0]}.attention_adapter").adapter_up
    with torch.no_grad():
        # Only block 0's attention adapter changes (not by a constant: layer norms would remove that).
        attention_up.bias.copy_(torch.linspace(-1, 1, D))
    assert (logits(model) - base).abs().max() > 1e-3
    with handle.disabled():
        assert torch.equal(logits(model), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_into_a_fresh_model_is_exact(arch, tmp_path):
    model = tiny(arch)
    handle = attach(model, AdapterConfig(placement="houlsby", reduction_factor=8, non_linearity="gelu",
                                         train_layer_norms=True))
    perturb(handle)
    expected = logits(model)
    assert (expected - logits(tiny(arch))).abs().max() > 1e-2
    handle.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "TUNEFORGE_BOTTLENECK_ADAPTER" and config["bottleneck_size"] == 4
    assert (config["ffn_module"], config["attention_module"]) == SITES[arch][1:]
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in saved)
    assert f"base_model.model.{SITES[arch][0]}.output_adapter.adapter_up.weight" in saved
    assert sum(v.numel() for v in saved.values()) == handle.num_trainable_parameters()
    fresh = tiny(arch)
    loaded = load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh), expected)
    assert loaded.num_trainable_parameters() == handle.num_trainable_parameters()
    (tmp_path / TUNEFORGE_ADAPTER_META).unlink()  # the peft_type alone identifies the method
    assert method_for_adapter(tmp_path) is Adapter


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_moves_only_adapters_and_disabling_restores_the_base(arch):
    model = tiny(arch)
    handle = attach(model, AdapterConfig(placement="houlsby", reduction_factor=4, train_layer_norms=True))
    assert handle.num_trainable_parameters() == 2 * LAYERS * (2 * D * 8 + 8 + D) + LAYERS * NORMS_PER_BLOCK[arch]
    base_model = tiny(arch)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    losses = fit(model, handle, inputs(rows=4, length=10), steps=6)
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    own = model.state_dict()
    # Norms are wrapped: the trained copies sit beside the originals, which live on as base_layer, bit-identical.
    copies = {f"{n}.{p}" for n in handle.norms for p in model.get_submodule(n).names}
    renamed = {k.replace(".base_layer.", "."): v for k, v in own.items() if "_adapter." not in k and k not in copies}
    assert renamed.keys() == base.keys()
    assert all(torch.equal(renamed[k], v) for k, v in base.items())
    with handle.disabled():
        assert torch.equal(logits(model), logits(base_model))
    assert not torch.equal(logits(model), logits(base_model))


def test_bf16_base_with_float32_adapters_keeps_the_base_dtype():
    model = tiny("llama", dtype=torch.bfloat16)
    handle = attach(model, AdapterConfig(placement="houlsby", reduction_factor=4, train_layer_norms=True))
    for _, p in handle.trainable_parameters():  # what the trainer does: adapters train in float32
        p.data = p.data.float()
    perturb(handle)
    out = model(**inputs())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for _, p in handle.trainable_parameters())


def test_explicit_and_missing_sub_module_names():
    model = tiny("llama")
    handle = attach(model, AdapterConfig(ffn_module="mlp.down_proj"))
    assert handle.hooked["model.layers.1.output_adapter"] == "model.layers.1.mlp.down_proj"
    with pytest.raises(ValueError, match="ffn_module"):
        attach(tiny("llama"), AdapterConfig(ffn_module="feed_forward_net"))


def test_a_deep_copy_hooks_its_own_adapters():
    import copy

    model = tiny("llama")
    handle = attach(model, AdapterConfig())
    perturb(handle)
    before = logits(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for module in clone.modules():
            if isinstance(module, BottleneckAdapter):
                module.adapter_up.weight.zero_()
                module.adapter_up.bias.zero_()
    assert torch.equal(logits(clone), logits(tiny("llama")))
    assert torch.equal(logits(model), before)


def test_remove_restores_the_plain_model():
    model = tiny("gpt2")
    handle = attach(model, AdapterConfig(placement="houlsby", train_layer_norms=True))
    perturb(handle)
    handle.remove()
    base = tiny("gpt2")
    assert model.state_dict().keys() == base.state_dict().keys()
    assert torch.equal(logits(model), logits(base))
    assert not any(isinstance(m, BottleneckAdapter) for m in model.modules())


def test_config_validation_and_routing():
    from tuneforge.config import load_config

    run = load_config(overrides={"method": "adapter", "adapter_placement": "houlsby", "adapter_reduction_factor": 8,
                                 "adapter_non_linearity": "silu"})
    config = get_method(run.method).config_class.from_dict(run.method_options)
    assert (config.placement, config.reduction_factor, config.non_linearity) == ("houlsby", 8, "silu")
    assert config.bottleneck(768) == 96 and AdapterConfig(bottleneck_size=64).bottleneck(768) == 64
    assert get_method("bottleneck-adapter") is Adapter
    with pytest.raises(ValueError, match="placement"):
        AdapterConfig(placement="parallel")
    with pytest.raises(ValueError, match="non_linearity"):
        AdapterConfig(non_linearity="softmax")



def test_trains_through_the_trainer_and_reloads(tmp_path, tokenizer, sft_file):
    """Through the trainer, saved, reloaded with equal logits."""
    options = {"placement": "houlsby", "reduction_factor": 4, "train_layer_norms": True}
    result = train_and_reload(tmp_path, tokenizer, sft_file, "adapter", options)
    assert result.steps == 2 and result.metrics["trainable_params"] == 2 * LAYERS * (2 * D * 8 + 8 + D) + LAYERS * 2 * D
