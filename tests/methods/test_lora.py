"""LoRA: exactness at init, merge / unmerge / disable, scaling, bias modes, targeting, Conv1D, and PEFT parity
(files both ways, trainable-parameter counts, adapter_config.json)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open

import tuneforge
from conftest import make_tiny_model
from tuneforge.methods.lora import LoRAConfig, LoRALinear

pytestmark = pytest.mark.usefixtures("single_thread")

peft = pytest.importorskip("peft")


def batch(vocab: int, seed: int = 1, b: int = 3, t: int = 9):
    """Right-padded ids and mask (row 1 has 3 pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask


@torch.no_grad()
def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def attached(arch, tokenizer, **options):
    model = make_tiny_model(arch, len(tokenizer))
    handle = tuneforge.attach(model, LoRAConfig(**options))
    return model, handle


def test_forward_equals_base_at_init(arch, tokenizer):
    base = make_tiny_model(arch, len(tokenizer))
    ids, mask = batch(len(tokenizer))
    expected = logits(base, ids, mask)
    model, handle = attached(arch, tokenizer, r=4, lora_dropout=0.1)
    assert handle.num_trainable_parameters() > 0
    assert torch.equal(logits(model.eval(), ids, mask), expected)  # B = 0: exactly the base model


def test_merge_unmerge_disable(arch, tokenizer):
    base = make_tiny_model(arch, len(tokenizer))
    ids, mask = batch(len(tokenizer))
    base_out = logits(base, ids, mask)
    model, handle = attached(arch, tokenizer, r=4, lora_alpha=8, init_lora_weights=False)
    adapted = logits(model, ids, mask)
    assert (adapted - base_out).abs().max() > 1e-3  # a non-trivial adapter
    weights_before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with handle.disabled():
        assert torch.equal(logits(model, ids, mask), base_out)
    assert torch.equal(logits(model, ids, mask), adapted)  # enabled again after the context

    handle.merge()
    assert all(m.merged for _, m in handle.lora_layers())
    torch.testing.assert_close(logits(model, ids, mask), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        with handle.disabled():
            logits(model, ids, mask)

    handle.unmerge()
    for n, p in model.named_parameters():
        if n in weights_before:
            torch.testing.assert_close(p, weights_before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids, mask), adapted, atol=1e-5, rtol=1e-5)
    with handle.disabled():  # W + ΔW - ΔW is W up to float rounding (as in PEFT)
        torch.testing.assert_close(logits(model, ids, mask), base_out, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_gives_plain_model(tokenizer):
    model, handle = attached("gpt2", tokenizer, r=4, init_lora_weights=False)
    ids, mask = batch(len(tokenizer))
    adapted = logits(model, ids, mask)
    plain = handle.merge_and_unload()
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(logits(plain, ids, mask), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling(tokenizer, use_rslora):
    r, alpha = 16, 8
    model, handle = attached("llama", tokenizer, r=r, lora_alpha=alpha, use_rslora=use_rslora,
                             init_lora_weights=False)
    expected = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert handle.config.scaling == pytest.approx(expected)
    name, layer = handle.lora_layers()[0]
    assert layer.scaling == pytest.approx(expected)
    # The update really is B A x * scaling.
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        manual = x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * expected
    torch.testing.assert_close(delta, manual, atol=1e-5, rtol=1e-4)


def _bias_names(model):
    return {n for n, _ in model.named_parameters() if n.endswith("bias")}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_trainable_and_saved(tokenizer, tmp_path, bias):
    # Qwen2 has q/k/v biases; adapting q_proj and o_proj makes lora_only differ from all (o_proj has no bias).
    model, handle = attached("qwen2", tokenizer, r=2, target_modules=["q_proj", "o_proj"], bias=bias)
    trainable = {n for n, _ in handle.trainable_parameters()}
    lora_names = {n for n in trainable if ".lora_" in n}
    assert len(lora_names) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    biases = trainable - lora_names
    if bias == "none":
        assert biases == set()
    elif bias == "all":
        assert biases == _bias_names(model) and len(biases) == 2 * 3  # q, k, v per layer
    else:
        assert biases == {f"model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in range(2)}
    assert set(handle.state_dict()) == {"base_model.model." + n for n in trainable}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in trainable)

    handle.save(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(handle.state_dict())
    pm = peft.get_peft_model(make_tiny_model("qwen2", len(tokenizer)),
                             peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], bias=bias))
    assert handle.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]


def test_target_modules_list_all_linear_and_regex(tokenizer):
    vocab = len(tokenizer)

    def wrapped(target, arch="llama"):
        _, handle = attached(arch, tokenizer, r=2, target_modules=target)
        return set(handle.module_names)

    assert wrapped(["q_proj", "v_proj"]) == {f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                             for p in ("q_proj", "v_proj")}
    everything = wrapped("all-linear")
    assert len(everything) == 2 * 7 and "lm_head" not in everything
    assert wrapped(r"model\.layers\.1\.mlp\.(up|down)_proj") == {"model.layers.1.mlp.up_proj",
                                                                 "model.layers.1.mlp.down_proj"}
    with pytest.raises(ValueError, match="matched no linear layer"):
        wrapped(["no_such_layer"])
    # PEFT selects the same layers for "all-linear" (output head excluded), on Llama and on GPT-2's Conv1D.
    for arch in ("llama", "gpt2"):
        pm = peft.get_peft_model(make_tiny_model(arch, vocab), peft.LoraConfig(r=2, target_modules="all-linear"))
        assert wrapped("all-linear", arch) == {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}


def test_conv1d_gpt2_layout_and_training(tokenizer):
    model, handle = attached("gpt2", tokenizer, r=4, target_modules=["c_attn", "c_fc"])
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (3 * 32, 4)
    assert handle.adapter_config()["fan_in_fan_out"] is True
    base_state = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids, mask = batch(len(tokenizer))
    opt = torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, base_state[n]) for n, p in model.named_parameters() if n in base_state)


# -- PEFT oracle -------------------------------------------------------------------------------------------


ORACLE_OPTIONS = [
    dict(r=4, lora_alpha=8),
    dict(r=4, lora_alpha=8, use_rslora=True, bias="all"),
]


@pytest.mark.parametrize("options", ORACLE_OPTIONS, ids=["plain", "rslora-bias-all"])
def test_peft_loads_our_adapter(arch, tokenizer, tmp_path, options):
    vocab = len(tokenizer)
    model, handle = attached(arch, tokenizer, init_lora_weights=False, lora_dropout=0.0, **options)
    with torch.no_grad():  # make trained biases matter too
        for n, p in handle.trainable_parameters():
            if n.endswith("bias"):
                p.add_(0.05)
    handle.save(tmp_path, base_model_name_or_path="tiny")
    ids, mask = batch(vocab)
    ours = logits(model.eval(), ids, mask)

    loaded = peft.PeftModel.from_pretrained(make_tiny_model(arch, vocab), str(tmp_path)).eval()
    theirs = logits(loaded, ids, mask)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (ours - logits(make_tiny_model(arch, vocab), ids, mask)).abs().max() > 1e-3

    fresh = peft.get_peft_model(make_tiny_model(arch, vocab), peft.LoraConfig(target_modules="all-linear", **options))
    assert handle.num_trainable_parameters() == fresh.get_nb_trainable_parameters()[0]


def test_tuneforge_loads_peft_adapter(arch, tokenizer, tmp_path):
    vocab = len(tokenizer)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, use_rslora=True)
    pm = peft.get_peft_model(make_tiny_model(arch, vocab), cfg).eval()
    pm.save_pretrained(str(tmp_path))
    ids, mask = batch(vocab)
    theirs = logits(pm, ids, mask)

    model = make_tiny_model(arch, vocab)
    handle = tuneforge.load_adapter(model, tmp_path)
    assert handle.config.use_rslora and handle.config.r == 4
    torch.testing.assert_close(logits(model, ids, mask), theirs, atol=1e-5, rtol=1e-5)
    assert handle.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]


def test_adapter_files_follow_peft_format(tokenizer, tmp_path):
    model, handle = attached("gpt2", tokenizer, r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["c_attn"])
    handle.save(tmp_path, base_model_name_or_path="my/base")
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"  # indented, sorted, as PEFT writes
    expected = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "my/base", "r": 4,
        "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none", "target_modules": ["c_attn"],
        "fan_in_fan_out": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }
    assert {k: config[k] for k in expected} == expected
    # Every key is one PEFT's LoraConfig knows (unknown keys would be dropped with a warning).
    assert set(config) <= set(peft.LoraConfig.__dataclass_fields__) | {"peft_type"}

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        shapes = {k: tuple(f.get_tensor(k).shape) for k in keys}
    assert keys == {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight" for i in range(2)
                    for ab in "AB"}
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] == (4, 32)
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == (96, 4)
    assert not any("default" in k for k in keys)
    meta = json.loads((tmp_path / "tuneforge_adapter.json").read_text())
    assert meta["method"] == "lora" and meta["options"]["r"] == 4


def test_regex_targets_round_trip_through_peft(tokenizer, tmp_path):
    # Only layer 1's q_proj: short names would select layer 0 too, so the saved target_modules must be a regex.
    vocab = len(tokenizer)
    model, handle = attached("llama", tokenizer, r=2, target_modules=r"model\.layers\.1\.self_attn\.q_proj",
                             init_lora_weights=False)
    handle.save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(saved, str)
    ids, mask = batch(vocab)
    loaded = peft.PeftModel.from_pretrained(make_tiny_model("llama", vocab), str(tmp_path)).eval()
    assert {n.removeprefix("base_model.model.") for n in loaded.targeted_module_names} == set(handle.module_names)
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), atol=1e-5, rtol=1e-5)
    reloaded = make_tiny_model("llama", vocab)
    tuneforge.load_adapter(reloaded, tmp_path)
    assert torch.equal(logits(reloaded, ids, mask), logits(model, ids, mask))


def test_load_rejects_mismatched_weights(tokenizer, tmp_path):
    _, handle = attached("llama", tokenizer, r=2, target_modules=["q_proj"])
    state = handle.state_dict()
    key = next(iter(state))
    with pytest.raises(KeyError, match="missing"):
        handle.load_state_dict({k: v for k, v in state.items() if k != key})
    bad = copy.copy(state)
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        handle.load_state_dict(bad)
