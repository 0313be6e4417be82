"""QLoRA: 4-bit bitsandbytes base (CPU path) + LoRA. PEFT and transformers' 4-bit loader are the oracles."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tuneforge.methods import attach, get_method, load_adapter
from tuneforge.methods.qlora import (
    QLoRA,
    QLoRAConfig,
    merge_to_16bit,
    merge_with_report,
    qlora_quantization_config,
    quantization_summary,
    quantize_model_,
)

peft = pytest.importorskip("peft")

ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)),
}


def tiny(arch: str, seed: int = 0) -> nn.Module:
    cls, config = ARCHS[arch]
    torch.manual_seed(seed)
    return cls(config).eval()


def tokens(seed: int = 1, batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def four_bit_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("options", [{}, {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}])
def test_quantize_model_equals_transformers_4bit_loader(tmp_path, arch, options):
    tiny(arch).save_pretrained(tmp_path)
    config = QLoRAConfig(**options)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=qlora_quantization_config(config, torch.float32), device_map={"": "cpu"},
        dtype=torch.float32)
    converted = type(loaded).from_pretrained(tmp_path, dtype=torch.float32)
    names = quantize_model_(converted, config)

    assert type(converted.get_output_embeddings()) is nn.Linear  # the head stays in float
    assert quantization_summary(converted)["num_4bit_layers"] == len(names) == (14 if arch == "llama" else 8)
    expected, got = loaded.state_dict(), converted.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:  # packed weights, absmax, nested statistics: all bit-identical
        assert torch.equal(expected[key], got[key]), key
    x = tokens()
    assert torch.equal(loaded(x).logits, converted(x).logits)


@pytest.mark.parametrize("options", [
    {"bnb_4bit_blocksize": 32},
    {"bnb_4bit_blocksize": 128, "bnb_4bit_quant_type": "fp4"},
    {"bnb_4bit_quant_storage": "bfloat16"},
    {"bnb_4bit_compute_dtype": "bfloat16"},
])
def test_cpu_4bit_options(options):
    float_model, model = tiny("llama"), tiny("llama")
    handle = attach(model, QLoRAConfig(r=4, **options))
    summary = handle.summary()["quantization"]
    assert summary["blocksize"] == options.get("bnb_4bit_blocksize", 64)
    assert summary["quant_type"] == options.get("bnb_4bit_quant_type", "nf4")
    assert summary["quant_storage"] == options.get("bnb_4bit_quant_storage", "uint8")
    compute = options.get("bnb_4bit_compute_dtype", "float32")
    assert summary["compute_dtype"] == compute
    assert {p.dtype for _, p in handle.trainable_parameters()} == {getattr(torch, compute)}  # LoRA in compute dtype
    x = tokens()
    with torch.no_grad():
        reference, quantised = float_model(x).logits, model(x).logits.float()
    # 4-bit rounding moves the logits, but only by a fraction of their spread.
    assert 0 < (quantised - reference).abs().mean() < 0.25 * reference.std()


def peft_twin(arch: str, config: QLoRAConfig, target_modules) -> nn.Module:
    model = tiny(arch)
    quantize_model_(model, config)
    lora = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=target_modules)
    return peft.get_peft_model(model, lora)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_same_logits_and_parameter_counts_as_peft(tmp_path, arch):
    config = QLoRAConfig(r=4, lora_alpha=8, init_lora_weights=False, bnb_4bit_quant_storage="bfloat16")
    model = tiny(arch)
    handle = attach(model, config)
    target = handle.adapter_config()["target_modules"]
    oracle = peft_twin(arch, config, target).eval()
    assert type(oracle.base_model.model.get_submodule(handle.module_names[0])).__module__ == "peft.tuners.lora.bnb"
    peft.set_peft_model_state_dict(oracle, handle.state_dict())

    x = tokens()
    with torch.no_grad():
        ours = model(x).logits
        assert torch.equal(ours, oracle(x).logits)
    assert (handle.num_trainable_parameters(), handle.num_total_parameters()) == oracle.get_nb_trainable_parameters()

    # PEFT loads tuneforge's files onto its own 4-bit base.
    handle.save(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "bnb_4bit_quant_type" not in saved  # quantisation belongs to the base
    base = tiny(arch)
    quantize_model_(base, config)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ours)


def test_loads_peft_saved_adapter_onto_float_model(tmp_path):
    config = QLoRAConfig(r=4, lora_alpha=8)
    oracle = peft_twin("llama", config, ["q_proj", "v_proj", "down_proj"]).eval()
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    oracle.save_pretrained(tmp_path)
    model = tiny("llama")
    handle = QLoRA.load(model, tmp_path)  # quantises the float model first (NF4, double quant: the defaults)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, oracle(x).logits)
    assert len(handle.module_names) == 6


def test_tuneforge_round_trip_keeps_quantisation_options(tmp_path):
    config = QLoRAConfig(r=4, init_lora_weights=False, bnb_4bit_quant_type="fp4", bnb_4bit_blocksize=128,
                         target_modules=["q_proj", "o_proj"])
    model = tiny("llama")
    handle = attach(model, config)
    handle.save(tmp_path)
    reloaded_model = tiny("llama")
    reloaded = load_adapter(reloaded_model, tmp_path)
    assert isinstance(reloaded.config, QLoRAConfig)
    assert reloaded.summary() == handle.summary()
    assert reloaded.summary()["quantization"]["quant_type"] == "fp4"
    x = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded_model(x).logits, model(x).logits)


def test_training_reduces_loss_and_leaves_the_4bit_base_untouched():
    model = tiny("llama").train()
    handle = attach(model, QLoRAConfig(r=8, lora_alpha=16))
    before = four_bit_state(model)
    optimizer = torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=1e-2)
    x = tokens(batch=4, length=12)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    after = four_bit_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_disabled_recovers_the_quantised_base_exactly():
    base, model = tiny("gpt2"), tiny("gpt2")
    quantize_model_(base, QLoRAConfig())
    handle = attach(model, QLoRAConfig(init_lora_weights=False))
    x = tokens()
    with torch.no_grad():
        assert not torch.equal(model(x).logits, base(x).logits)
        with handle.disabled():
            assert torch.equal(model(x).logits, base(x).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_to_16bit_gives_a_plain_model_with_the_adapted_outputs(tmp_path, arch):
    model = tiny(arch)
    handle = attach(model, QLoRAConfig(r=4, init_lora_weights=False))
    with pytest.raises(RuntimeError, match="merge_to_16bit"):
        handle.merge()
    x = tokens()
    merged, report = merge_with_report(handle, x, dtype=torch.float32)
    assert merged is model
    assert not any(type(p).__name__ == "Params4bit" for p in merged.parameters())
    assert not any(type(m).__name__ in ("Linear4bit", "LoRALinear") for m in merged.modules())
    assert report["tokens"] == x.numel() and report["dtype"] == "float32"
    assert report["max_abs_diff"] < 1e-4 < report["logit_std"]

    merged.save_pretrained(tmp_path)  # an ordinary float checkpoint: no quantisation config left behind
    reloaded = type(merged).from_pretrained(tmp_path).eval()
    assert not hasattr(reloaded.config, "quantization_config")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, merged(x).logits)


def test_merge_a_model_transformers_loaded_in_4bit(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "base")
    config = QLoRAConfig(r=4, init_lora_weights=False)
    kwargs = QLoRA.model_load_kwargs(config.to_dict())  # what the trainer passes to load_model
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map={"": "cpu"}, dtype=torch.float32,
                                                 **kwargs)
    handle = attach(model, config)
    assert handle.summary()["quantization"]["num_4bit_layers"] == 14  # attach did not quantise twice
    merged = handle.merge_to_16bit(torch.bfloat16)  # transformers refuses .to(dtype) on a model still marked 4-bit
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.dtype == torch.bfloat16 and not hasattr(reloaded.config, "quantization_config")
    assert QLoRA.model_load_kwargs({"bnb_4bit_blocksize": 128}) == {}  # transformers cannot: attach quantises


def test_merge_to_bfloat16_reports_the_rounding():
    model = tiny("llama")
    handle = attach(model, QLoRAConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    x = tokens()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    merged, report = merge_with_report(handle, x, mask, dtype="bfloat16")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert report["tokens"] == x.numel() - 3
    assert 0 < report["mean_abs_diff"] <= report["max_abs_diff"] < report["logit_std"]


def test_merge_to_16bit_also_dequantises_untargeted_layers():
    model = tiny("llama")
    handle = attach(model, QLoRAConfig(target_modules=["v_proj"]))
    merged = merge_to_16bit(handle)  # default: the dtype the model was loaded in (float32 here), no extra rounding
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("proj", "lm_head")))
    assert {p.dtype for p in merged.parameters()} == {torch.float32}


def test_config_checks_and_registry():
    assert get_method("q-lora") is QLoRA
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        QLoRAConfig(bnb_4bit_quant_type="int4")
    with pytest.raises(ValueError, match="bnb_4bit_blocksize"):
        QLoRAConfig(bnb_4bit_blocksize=48)
    with pytest.raises(ValueError, match="unknown option"):
        QLoRAConfig.from_dict({"bnb_4bit_quant": "nf4"})
    assert QLoRAConfig.from_dict({"r": 16, "bnb_4bit_quant_type": "fp4"}).r == 16
    with pytest.raises(ValueError, match="block size 64"):
        qlora_quantization_config(QLoRAConfig(bnb_4bit_blocksize=128))
    bnb_config = qlora_quantization_config(QLoRAConfig(), torch.bfloat16)
    assert (bnb_config.load_in_4bit, bnb_config.bnb_4bit_quant_type, bnb_config.bnb_4bit_use_double_quant,
            bnb_config.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
