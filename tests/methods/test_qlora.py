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


# -- bitsandbytes' packed CPU layout (AVX-512 BF16) ---------------------------------------------------------------
# bitsandbytes repacks a 4-bit layer for a bf16 inference kernel during a gradient-free eval pass on CPUs with
# AVX-512 BF16; tuneforge keeps that layout off (methods/qlora.py says why). The conversion itself is plain torch,
# so the tests force it on every CPU; the kernel that runs on packed weights exists only on AVX-512 BF16 CPUs.

def has_avx512bf16() -> bool:
    import bitsandbytes.functional as F

    return bool(getattr(F, "has_avx512bf16", lambda: False)())


def fits_cpu_packed_layout(layer: nn.Module) -> bool:
    """bitsandbytes' own conditions in _convert_weight_packed_for_cpu (block_n 32, whole blocks per row)."""
    out_features, in_features = layer.weight.quant_state.shape
    return out_features % 32 == 0 and in_features % layer.weight.blocksize == 0


def force_cpu_packing_(model: nn.Module) -> int:
    """Pack every layer bitsandbytes could pack, as its Linear4bit.forward does on an AVX-512 BF16 CPU."""
    import bitsandbytes.functional as F

    packed = 0
    for layer in model.modules():
        if type(layer).__name__ == "Linear4bit" and fits_cpu_packed_layout(layer):
            layer.weight.data, layer.weight.quant_state = F._convert_weight_packed_for_cpu(
                layer.weight.data, layer.weight.quant_state)
            packed += 1
    return packed


def four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def round_scales_to_bf16_(model: nn.Module) -> None:
    """What packing does to the block scales (without double quantisation), for a reference that never packed."""
    for layer in four_bit_layers(model).values():
        layer.weight.quant_state.absmax = layer.weight.quant_state.absmax.bfloat16().float()


def odd_llama(hidden: int = 48, intermediate: int = 80, seed: int = 0) -> nn.Module:
    """Shapes bitsandbytes' packed conversion cannot take: in_features below the block size, out_features not a
    multiple of 32 (they crashed inside bitsandbytes before)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def lora_grads(model: nn.Module, handle, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad.clone() for n, p in handle.trainable_parameters()}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("shape", [(48, 80), (32, 64), (64, 128)])
def test_any_layer_shape_evaluates_generates_and_trains(shape):
    model = odd_llama(*shape)
    handle = attach(model, QLoRAConfig(r=4, init_lora_weights=False))
    x = tokens(length=8)
    model.eval()
    with torch.no_grad():  # the gradient-free eval pass that made bitsandbytes pack (and crash on odd shapes)
        before = model(x).logits
        out = model.generate(x, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 12)
    assert handle.summary()["quantization"]["cpu_packed_layers"] == 0
    grads = lora_grads(model, handle, x)
    assert all(g.abs().sum() > 0 for g in grads.values())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_an_eval_pass_leaves_the_training_gradients_unchanged():
    # Packable shapes: on an AVX-512 BF16 CPU bitsandbytes' default would pack here, and the packed matmul has no
    # backward, so the LoRA factors below each packed layer would get a gradient without the base path's share.
    x = tokens(length=8)
    fresh = odd_llama(64, 128)
    fresh_handle = attach(fresh, QLoRAConfig(r=4, init_lora_weights=False))
    evaluated = odd_llama(64, 128)
    evaluated_handle = attach(evaluated, QLoRAConfig(r=4, init_lora_weights=False))
    evaluated.eval()
    with torch.no_grad():
        evaluated(x)
    expected, got = lora_grads(fresh, fresh_handle, x), lora_grads(evaluated, evaluated_handle, x)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize("double_quant", [False, True])
def test_attach_unpacks_a_model_bitsandbytes_packed(double_quant):
    """A 4-bit model that ran bitsandbytes' CPU inference kernel before QLoRA was attached (forced on every CPU)."""
    config = QLoRAConfig(r=4, bnb_4bit_use_double_quant=double_quant)
    reference, model = odd_llama(64, 128), odd_llama(64, 128)
    quantize_model_(reference, config)
    quantize_model_(model, config)
    if not double_quant:  # packing rounds the block scales to bf16 for good; the rest must come back exactly
        round_scales_to_bf16_(reference)
    assert force_cpu_packing_(model) == 14  # every projection of this shape fits the packed layout
    assert quantization_summary(model)["cpu_packed_layers"] == 14

    handle = attach(model, config)
    assert handle.summary()["quantization"]["cpu_packed_layers"] == 0
    x = tokens()
    with torch.no_grad():
        expected, got = reference.eval()(x).logits, model.eval()(x).logits
    if double_quant:
        # bitsandbytes' way back re-quantises the 8-bit scales from their de-quantised values: close, not exact.
        assert (got - expected).abs().max() < 0.02 * expected.std()
    else:
        assert torch.equal(got, expected)
        restored, original = four_bit_layers(model), four_bit_layers(reference)
        assert restored.keys() == original.keys()
        for name, layer in original.items():
            assert torch.equal(restored[name].weight.data, layer.weight.data), name
            assert torch.equal(restored[name].weight.quant_state.absmax, layer.weight.quant_state.absmax), name


def test_merge_dequantises_a_packed_layer_exactly():
    config = QLoRAConfig(r=4, init_lora_weights=False, bnb_4bit_use_double_quant=False)
    unpacked, packed = odd_llama(64, 128), odd_llama(64, 128)
    handles = [attach(m, config) for m in (unpacked, packed)]
    handles[1].load_state_dict(handles[0].state_dict())
    round_scales_to_bf16_(unpacked)
    assert force_cpu_packing_(packed) == 14  # as if something ran bitsandbytes' kernel after attach
    merged = [merge_to_16bit(h, torch.float32) for h in handles]
    for a, b in zip(merged[0].state_dict().values(), merged[1].state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes packs 4-bit weights only on AVX-512 BF16 CPUs")
def test_a_transformers_4bit_model_that_bitsandbytes_packed_trains_correctly(tmp_path):
    """The real path on this CPU: transformers' 4-bit loader leaves packing on, an inference pass packs, QLoRA's
    attach takes the model back to the portable layout and its gradients equal a never-packed twin's."""
    odd_llama(64, 128).save_pretrained(tmp_path)
    config = QLoRAConfig(r=4, init_lora_weights=False, bnb_4bit_use_double_quant=False)
    load = dict(quantization_config=qlora_quantization_config(config, torch.float32), device_map={"": "cpu"},
                dtype=torch.float32)
    x = tokens(length=8)
    used = AutoModelForCausalLM.from_pretrained(tmp_path, **load).eval()
    with torch.no_grad():
        used(x)  # bitsandbytes' own packed kernel runs here
    assert quantization_summary(used)["cpu_packed_layers"] == 14
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path, **load)
    round_scales_to_bf16_(fresh)
    handles = [attach(m, config) for m in (fresh, used)]
    handles[1].load_state_dict(handles[0].state_dict())
    expected, got = lora_grads(fresh, handles[0], x), lora_grads(used, handles[1], x)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
