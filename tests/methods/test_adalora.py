"""AdaLoRA: SVD-form LoRA with importance-driven rank pruning. PEFT's AdaLoRA is the oracle, step by step."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tuneforge.methods import attach, get_method, load_adapter
from tuneforge.methods.adalora import AdaLoRA, AdaLoRAConfig, RankAllocator, SVDLinear

peft = pytest.importorskip("peft")

ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)),
}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"],
           "qwen2": ["q_proj", "k_proj", "o_proj"]}


def tiny(arch: str = "llama") -> nn.Module:
    cls, config = ARCHS[arch]
    torch.manual_seed(0)
    return cls(config).eval()


def tokens(seed: int = 1, batch: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def peft_config(config: AdaLoRAConfig, target_modules) -> "peft.AdaLoraConfig":
    return peft.AdaLoraConfig(
        init_r=config.init_r, target_r=config.target_r, lora_alpha=config.lora_alpha, tinit=config.tinit,
        tfinal=config.tfinal, deltaT=config.deltaT, beta1=config.beta1, beta2=config.beta2,
        orth_reg_weight=config.orth_reg_weight, total_step=config.total_step, target_modules=target_modules,
        task_type="CAUSAL_LM")


def twins(arch: str, config: AdaLoRAConfig):
    """Our AdaLoRA and PEFT's on identical tiny models, with identical (non-zero) weights."""
    model = tiny(arch)
    handle = attach(model, config)
    oracle = peft.get_peft_model(tiny(arch), peft_config(config, handle.adapter_config()["target_modules"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "lora_E" in name:
                p.normal_()  # E starts at 0 (the base model); make the adapter matter
    handle.load_state_dict(peft.get_peft_model_state_dict(oracle))
    return model, handle, oracle


def peft_rank_pattern(oracle) -> dict | None:
    pattern = oracle.peft_config["default"].rank_pattern
    return {k.replace(".default", ""): v for k, v in pattern.items()} if pattern else None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_same_logits_regulariser_and_parameter_counts_as_peft(arch):
    config = AdaLoRAConfig(init_r=4, target_r=2, lora_alpha=16, total_step=10, target_modules=TARGETS[arch])
    model, handle, oracle = twins(arch, config)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, oracle(x).logits)
        # PEFT adds the orthogonality term to the loss itself when labels are given; ours comes via extra_loss().
        ours = model(input_ids=x, labels=x).loss + handle.extra_loss()
        assert torch.equal(ours, oracle(input_ids=x, labels=x).loss)
        assert handle.extra_loss() > 0
    assert (handle.num_trainable_parameters(), handle.num_total_parameters()) == oracle.get_nb_trainable_parameters()
    if arch == "gpt2":
        assert handle.adapter_config()["fan_in_fan_out"] is True


@pytest.mark.parametrize("kwargs", [dict(tinit=0, tfinal=0, deltaT=1), dict(tinit=3, tfinal=5, deltaT=4)])
def test_budget_schedule_matches_peft(kwargs):
    config = AdaLoRAConfig(init_r=6, target_r=2, total_step=20, target_modules=TARGETS["llama"], **kwargs)
    model, handle, oracle = twins("llama", config)
    ours = RankAllocator(handle.layers(), config)
    theirs = oracle.base_model.rankallocator
    assert (ours.init_bgt, ours.target_bgt) == (theirs.init_bgt, theirs.target_bgt) == (36, 12)
    assert [ours.budget_schedule(s, 20) for s in range(21)] == [theirs.budget_schedule(s) for s in range(21)]


@pytest.fixture(scope="module")
def lockstep():
    """Train ours and PEFT's side by side through warm-up, cubic pruning and the final phase (12 steps)."""
    config = AdaLoRAConfig(init_r=6, target_r=2, lora_alpha=8, total_step=12, tinit=2, tfinal=3, deltaT=2,
                           target_modules=TARGETS["llama"])
    model, handle, oracle = twins("llama", config)
    ours, theirs = dict(model.named_parameters()), dict(oracle.named_parameters())
    peft_name = {n: f"base_model.model.{n}.default" for n, _ in handle.trainable_parameters()}
    opt_ours = torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in oracle.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    history = []
    for step in range(config.total_step):
        oracle(input_ids=x, labels=x).loss.backward()
        (model(input_ids=x, labels=x).loss + handle.extra_loss()).backward()
        grad_diff = max((ours[n].grad - theirs[peft_name[n]].grad).abs().max().item() for n in peft_name)
        for n in peft_name:  # identical gradients in: the allocator is compared on exactly the same inputs
            ours[n].grad.copy_(theirs[peft_name[n]].grad)
        handle.after_backward(step)
        opt_ours.step()
        opt_theirs.step()
        oracle.base_model.update_and_allocate(step)  # 0-based global_step, as tuneforge's trainer counts
        handle.after_step(step)
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        weights_equal = all(torch.equal(ours[n], theirs[peft_name[n]]) for n in peft_name)
        history.append((grad_diff, weights_equal, handle.rank_pattern, peft_rank_pattern(oracle)))
    return config, model, handle, oracle, history


def test_rank_allocator_masks_the_same_triplets_as_peft(lockstep):
    config, model, handle, oracle, history = lockstep
    for step, (grad_diff, weights_equal, ours, theirs) in enumerate(history):
        assert grad_diff < 1e-6, step
        assert weights_equal, step  # includes every lora_E zeroed by masking
        assert ours == theirs, step
    assert history[config.tinit][2] is None  # warm-up: full budget, no masking yet
    assert history[-1][2] is not None
    final = handle.summary()["final_ranks"]
    assert sum(final.values()) == config.target_r * len(final) and len(set(final.values())) > 1
    assert set(handle.summary()["rank_pattern"]) == {f"{n}.lora_E" for n in final}
    for name, layer in handle.layers().items():  # pruned triplets hold λ = 0
        keep = torch.tensor(handle.rank_pattern[f"{name}.lora_E"])
        assert torch.all(layer.lora_E[~keep] == 0)


def test_pruned_adapter_round_trips_through_peft_and_tuneforge(lockstep, tmp_path):
    config, model, handle, oracle, _ = lockstep
    x = tokens(seed=7)
    handle.save(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 12
    assert saved["rank_pattern"] == handle.rank_pattern
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    final = handle.final_ranks()
    for name, layer in handle.layers().items():  # cut to the kept triplets; PEFT's keys, no ".weight"
        prefix, rank = f"base_model.model.{name}", final[name]
        assert tensors[f"{prefix}.lora_A"].shape == (rank, layer.in_features)
        assert tensors[f"{prefix}.lora_E"].shape == (rank, 1)
        assert tensors[f"{prefix}.lora_B"].shape == (layer.out_features, rank)
    assert len(tensors) == 3 * len(final)

    peft_loaded = peft.PeftModel.from_pretrained(tiny(), tmp_path / "ours").eval()
    ours_loaded_model = tiny()
    ours_loaded = load_adapter(ours_loaded_model, tmp_path / "ours")
    assert ours_loaded.final_ranks() == final
    with torch.no_grad():
        reference = peft_loaded(x).logits
        assert torch.equal(ours_loaded_model(x).logits, reference)  # both cut: identical arithmetic
        assert torch.allclose(model(x).logits, reference, atol=1e-6)  # full-size with λ = 0 vs cut

    oracle.save_pretrained(tmp_path / "peft")  # PEFT's own files load in tuneforge
    theirs_model = tiny()
    theirs = get_method("adalora").load(theirs_model, tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(theirs_model(x).logits, reference)
    assert theirs.final_ranks() == final


def test_training_reduces_loss_prunes_to_budget_and_keeps_the_base():
    model = tiny("gpt2").train()
    handle = attach(model, AdaLoRAConfig(init_r=4, target_r=2, lora_alpha=32, tinit=2, tfinal=2, deltaT=1))
    handle.begin_training(10)  # what the trainer does when total_step is unset
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "ranknum" not in k}
    optimizer = torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=2e-2)
    x = tokens(batch=4, length=12)
    losses = []
    for step in range(10):
        loss = model(input_ids=x, labels=x).loss
        (loss + handle.extra_loss()).backward()
        handle.after_backward(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # even with gradients gone, after_step has what it needs
        handle.after_step(step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert sum(handle.final_ranks().values()) == 2 * len(handle.module_names)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def run_steps(model, handle, optimizer, steps, x):
    for step in steps:
        (model(input_ids=x, labels=x).loss + handle.extra_loss()).backward()
        handle.after_backward(step)
        optimizer.step()
        handle.after_step(step)
        optimizer.zero_grad(set_to_none=True)


def test_resume_with_training_state_reaches_the_uninterrupted_result():
    config = AdaLoRAConfig(init_r=4, target_r=1, lora_alpha=32, tinit=1, tfinal=2, total_step=8, deltaT=2)
    x = tokens()

    def fresh():
        model = tiny("qwen2")
        handle = attach(model, config)
        return model, handle, torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=2e-2)

    model, handle, optimizer = fresh()
    run_steps(model, handle, optimizer, range(8), x)

    model_a, handle_a, optimizer_a = fresh()
    run_steps(model_a, handle_a, optimizer_a, range(4), x)
    trainable = {n: p.detach().clone() for n, p in handle_a.trainable_parameters()}
    saved_state, saved_opt = handle_a.training_state(), optimizer_a.state_dict()
    model_b, handle_b, optimizer_b = fresh()  # "killed and restarted": only the checkpointed state survives
    with torch.no_grad():
        for n, p in handle_b.trainable_parameters():
            p.copy_(trainable[n])
    optimizer_b.load_state_dict(saved_opt)
    handle_b.load_training_state(saved_state)
    run_steps(model_b, handle_b, optimizer_b, range(4, 8), x)

    assert handle_b.rank_pattern == handle.rank_pattern
    assert all(torch.equal(p, dict(handle.trainable_parameters())[n]) for n, p in handle_b.trainable_parameters())


def test_resume_inside_the_final_phase_recovers_the_pattern_from_pruned_zeros():
    config = AdaLoRAConfig(init_r=4, target_r=1, lora_alpha=32, tinit=1, tfinal=3, total_step=6)
    model, handle, _ = twins("llama", config)
    optimizer = torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=2e-2)
    x = tokens()
    run_steps(model, handle, optimizer, range(4), x)  # step 3 = total_step - tfinal fixes the pattern
    pattern = handle.rank_pattern
    handle.rank_pattern, handle.allocator = None, None  # what a restart without training_state knows
    run_steps(model, handle, optimizer, range(4, 6), x)
    assert handle.rank_pattern == pattern
    for name, layer in handle.layers().items():
        assert torch.all(layer.lora_E[~torch.tensor(pattern[f"{name}.lora_E"])] == 0)


def test_disabled_recovers_base_logits_exactly_and_merge_folds_the_update():
    base = tiny("gpt2")
    config = AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS["gpt2"])
    model, handle, _ = twins("gpt2", config)
    x = tokens()
    with torch.no_grad():
        adapted = model(x).logits
        with handle.disabled():
            assert torch.equal(model(x).logits, base(x).logits)
        assert not torch.allclose(adapted, base(x).logits, atol=1e-3)
        merged = handle.merge_and_unload()
        assert not any(isinstance(m, SVDLinear) for m in merged.modules())
        assert torch.allclose(merged(x).logits, adapted, atol=1e-5)


def test_config_options_and_errors():
    assert get_method("ada-lora") is AdaLoRA
    assert AdaLoRAConfig.from_dict({"delta_t": 5, "init_r": 8}).deltaT == 5
    with pytest.raises(ValueError, match="unknown option"):
        AdaLoRAConfig.from_dict({"r": 8})
    with pytest.raises(ValueError, match="target_r"):
        AdaLoRAConfig(init_r=4, target_r=6)
    with pytest.raises(ValueError, match="budgeting phase"):
        AdaLoRAConfig(tinit=5, tfinal=5, total_step=10)
    model = tiny()
    handle = attach(model, AdaLoRAConfig(init_r=2, target_r=1, tinit=4))
    with pytest.raises(RuntimeError, match="run length"):
        handle.after_step(0)
    with pytest.raises(ValueError, match="budgeting phase"):
        handle.begin_training(4)
    assert handle.extra_loss().requires_grad
    assert AdaLoRA.attach(tiny(), AdaLoRAConfig(orth_reg_weight=0)).extra_loss() is None
