"""Mixture-of-experts models: LoRA on the fused experts and PEFT-exact files, against PEFT as the oracle.

Tiny random Qwen3-MoE (a dense layer first), Mixtral, gpt-oss (transposed experts with biases, sliding attention)
and DeepSeek-V3 (MLA, shared experts, a dense first layer), plus a dense Llama, each x experts adapted or not:
PEFT loads the saved file with exactly our tensors (no missing or unexpected key) and gives our logits; tuneforge
loads PEFT's own files; merged equals unmerged; packed equals padded; SFT and DPO train through the trainer with
the model's own router loss and per-expert counts in the metrics.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
from conftest import make_tiny_model, qa_rows, write_jsonl
from tuneforge.data.formats import normalise
from tuneforge.data.template import ensure_chat_template
from tuneforge.methods.grouped_mm import _GROUPED_MM as GROUPED_KERNEL
from tuneforge.methods.grouped_mm import Groups, grouped_mm, padded_bmm
from tuneforge.methods.grouped_mm import _ContiguousGrad as ContiguousGrad
from tuneforge.methods.lora import LoRAConfig
from tuneforge.methods.lora_experts import LoRAExperts
from tuneforge.objectives import get_objective
from tuneforge.models.logprobs import sequence_logps
from tuneforge.models.moe import find_experts
from tuneforge.run.trainer import Trainer, training_examples

pytestmark = pytest.mark.usefixtures("single_thread")

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MOE = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]


def moe_config(arch: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, tie_word_embeddings=False, num_experts_per_tok=2)
    if arch == "qwen3_moe":  # layer 0 dense (mlp_only_layers): its gate_proj must not reach the experts in PEFT
        return transformers.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                           num_key_value_heads=2, head_dim=8, mlp_only_layers=[0])
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=16, num_local_experts=4, num_key_value_heads=2)
    if arch == "gpt_oss":
        return transformers.GptOssConfig(**common, intermediate_size=16, num_local_experts=4, num_key_value_heads=2,
                                         head_dim=8, layer_types=["sliding_attention", "full_attention"],
                                         sliding_window=8)
    if arch == "deepseek_v3":
        return transformers.DeepseekV3Config(**common, intermediate_size=64, moe_intermediate_size=16,
                                             num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                                             qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_group=2,
                                             topk_group=1)
    raise ValueError(arch)


def tiny(arch: str, vocab: int, seed: int = 0):
    if arch == "llama":
        return make_tiny_model("llama", vocab, seed)
    torch.manual_seed(seed)
    config = moe_config(arch, vocab)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 0, 3
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model.eval()


def batch(vocab: int, b: int = 3, t: int = 9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def peft_load(arch, vocab, directory):
    """PEFT's model from our files, after checking PEFT holds exactly our tensors and warned about no key."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny(arch, vocab), str(directory)).eval()
    assert not [w for w in caught if "keys" in str(w.message)], [str(w.message) for w in caught]
    ours = load_file(str(directory / "adapter_model.safetensors"))
    theirs = peft.get_peft_model_state_dict(loaded)
    assert set(theirs) == set(ours)  # nothing missing, nothing unexpected
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key
    return loaded


@pytest.mark.parametrize("experts", [True, False], ids=["experts", "no-experts"])
@pytest.mark.parametrize("arch", MOE + ["llama"])
def test_peft_loads_our_file_exactly_and_merge_equals_unmerged(arch, experts, tokenizer, tmp_path):
    vocab = len(tokenizer)
    ids, mask = batch(vocab)
    model = tiny(arch, vocab)
    base = logits(model, ids, mask)
    handle = tuneforge.attach(model, LoRAConfig(r=2, init_lora_weights=False, target_experts=experts))
    assert bool(handle.expert_layers()) == (experts and arch != "llama")
    ours = logits(model, ids, mask)
    assert (ours - base).abs().max() > 1e-3
    handle.save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] and not isinstance(saved["target_modules"], str) or arch == "llama"
    torch.testing.assert_close(logits(peft_load(arch, vocab, tmp_path), ids, mask), ours, atol=1e-5, rtol=1e-5)

    handle.merge()  # float32 rounding of W + ΔW: gpt-oss' larger logits differ by ~2e-5
    torch.testing.assert_close(logits(model, ids, mask), ours, atol=1e-4, rtol=1e-4)
    handle.unmerge()
    with handle.disabled():
        torch.testing.assert_close(logits(model, ids, mask), base, atol=1e-5, rtol=1e-5)

    reloaded = tiny(arch, vocab)
    tuneforge.load_adapter(reloaded, tmp_path)
    torch.testing.assert_close(logits(reloaded, ids, mask), ours, atol=1e-6, rtol=1e-6)
    plain = handle.merge_and_unload()
    assert not any(isinstance(m, LoRAExperts) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids, mask), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", MOE)
def test_tuneforge_loads_peft_expert_adapter_and_gets_its_gradients(arch, tokenizer, tmp_path):
    vocab = len(tokenizer)
    experts = [n for n, p in tiny(arch, vocab).named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
               and p.dim() == 3]
    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "o_proj"] if arch != "deepseek_v3"
                             else ["q_b_proj", "o_proj"], target_parameters=experts, init_lora_weights=False)
    oracle = peft.get_peft_model(tiny(arch, vocab), config)
    oracle.save_pretrained(str(tmp_path))
    ids, mask = batch(vocab)
    model = tiny(arch, vocab)
    handle = tuneforge.load_adapter(model, tmp_path)
    assert handle.expert_layers()
    torch.testing.assert_close(logits(model, ids, mask), logits(oracle, ids, mask), atol=1e-5, rtol=1e-5)

    # One backward: the expert factors get PEFT's gradients (compared in PEFT's on-disk layout).
    for m in (model, oracle):
        m.train()
        m(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
    ours = {}
    for name, layer in handle.expert_layers():
        grads = {}
        for p in layer.parameter_names:
            grads.update({f"{k}.grad": v for k, v in _expert_grads(layer, p, name).items()})
        ours.update(grads)
    theirs = {n.replace(".default", ""): p.grad for n, p in oracle.named_parameters() if p.grad is not None}
    for key, grad in ours.items():
        torch.testing.assert_close(grad, theirs["base_model.model." + key.removesuffix(".grad")], atol=1e-6,
                                   rtol=1e-4, msg=key)


def _expert_grads(layer: LoRAExperts, parameter: str, path: str) -> dict[str, torch.Tensor]:
    """The gradients of one parameter's factors as PEFT's tensors (``peft_state`` applied to the gradients)."""
    prefix = layer.peft_keys(path)[parameter]
    a, b = layer.lora_A[parameter].grad, layer.lora_B[parameter].grad
    return {f"{prefix}.lora_A.weight": a.reshape(-1, a.shape[-1]),
            f"{prefix}.lora_B.weight": b.permute(1, 2, 0).reshape(b.shape[1], -1)}


def test_grouped_product_equals_padded_bmm_and_a_loop():
    torch.manual_seed(0)
    index = torch.tensor([[2, 0], [2, 3], [0, 2], [3, 0], [2, 0]])
    groups = Groups.of(index, num_experts=5)  # expert 1 and 4 get no token
    x = torch.randn(index.numel(), 8, dtype=torch.float64)
    w = torch.randn(5, 8, 4, dtype=torch.float64)
    loop = torch.stack([x[i] @ w[e] for i, e in enumerate(groups.experts.tolist())])
    torch.testing.assert_close(padded_bmm(x, w, groups), loop)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    torch.testing.assert_close(grouped_mm(x32, w32, groups), loop.float(), atol=1e-5, rtol=1e-5)
    if GROUPED_KERNEL is not None:  # the kernel CUDA runs takes our offsets too (and its backward our gradients)
        kernel = ContiguousGrad.apply(GROUPED_KERNEL(x32, w32, offs=groups.offsets))
        torch.testing.assert_close(kernel, loop.float(), atol=1e-5, rtol=1e-5)
        kernel.sum().backward()
        torch.testing.assert_close(w32.grad, torch.stack([x32[groups.experts == e].sum(0).detach()[:, None].expand(8, 4)
                                                         for e in range(5)]), atol=1e-5, rtol=1e-5)
    assert groups.counts.tolist() == [4, 0, 4, 2, 0]


def test_gpt_oss_is_not_packed():
    """transformers 5's gpt-oss builds its masks without the position ids: packed examples would see each other."""
    from tuneforge.data.packing import model_packing_refusal

    assert "position ids" in model_packing_refusal(tiny("gpt_oss", 320))
    assert all(model_packing_refusal(tiny(arch, 320)) is None for arch in MOE if arch != "gpt_oss")


@pytest.mark.parametrize("arch", [a for a in MOE if a != "gpt_oss"])
def test_packed_equals_padded(arch, tokenizer):
    tok = copy.deepcopy(tokenizer)
    ensure_chat_template(tok)
    objective = get_objective("sft")(tok)
    rows = qa_rows(6)
    for i, row in enumerate(rows):
        row["output"] = " ".join([row["output"]] * (1 + i % 3))
    items = objective.prepare([normalise(r, "alpaca", f"qa:{i}") for i, r in enumerate(rows)], 128)
    padded = objective.collate(items)
    objective.pack_capacity = 128
    packed = objective.collate(items)
    model = tiny(arch, len(tok))
    tuneforge.attach(model, LoRAConfig(r=2, init_lora_weights=False))
    results = []
    for b in (padded, packed):
        model.zero_grad(set_to_none=True)
        logps = sequence_logps(model, b)
        logps.sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert want_grads.keys() == got_grads.keys() and any(".lora_A.gate_up_proj" in n for n in want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def train(arch, tokenizer, tmp_path, objective="sft", **options):
    if objective == "dpo":
        rows = [{"prompt": f"Say {i} in words.", "chosen": "yes " * (1 + i % 3), "rejected": "no"} for i in range(8)]
    else:
        rows = qa_rows(8)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    values = dict(model="tiny", method="lora", objective=objective, data=str(data), max_steps=2, batch_size=4,
                  learning_rate=1e-2, output=str(tmp_path / "run"), eval_generate=False, progress=False,
                  general_eval="none", method_options={"r": 2, **options})
    config = tuneforge.load_config(None, values)
    model = tiny(arch, len(tokenizer))
    trainer = Trainer(config, model, copy.deepcopy(tokenizer))
    trainer.prepare_data(*training_examples(config))
    trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return trainer, [m for m in metrics if "expert_tokens" in m]


@pytest.mark.parametrize("experts", [True, False], ids=["experts", "no-experts"])
@pytest.mark.parametrize("arch, objective", [("qwen3_moe", "sft"), ("mixtral", "dpo"), ("gpt_oss", "sft"),
                                             ("deepseek_v3", "sft")])
def test_training_adds_the_router_loss_counts_experts_and_saves_a_peft_exact_file(arch, objective, experts,
                                                                                 tokenizer, tmp_path):
    trainer, steps = train(arch, tokenizer, tmp_path, objective, target_experts=experts)
    assert len(steps) == 2
    assert bool(trainer.handle.expert_layers()) == experts
    layers = len(find_experts(trainer.model))
    top_k = trainer.model.config.num_experts_per_tok
    # Every real token reaches top_k experts in each MoE layer (a packed row's trailing pad tokens count too).
    for s in steps:
        assert len(s["expert_tokens"]) == 4 and sum(s["expert_tokens"]) % (layers * top_k) == 0
        assert sum(s["expert_tokens"]) >= s["tokens"] * layers * top_k
        assert s["expert_load_max"] == pytest.approx(max(s["expert_tokens"]) * 4 / sum(s["expert_tokens"]), abs=1e-6)
    assert ("router_aux_loss" in steps[0]) == (arch != "deepseek_v3")  # DeepSeek-V3 balances with a bias instead
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if n.endswith(("gate.weight",
                                                                                               "router.weight")))
    adapter = tmp_path / "run" / "adapter"
    if not adapter.exists():
        adapter = tmp_path / "run"
    vocab = len(tokenizer)
    ids, mask = batch(vocab)
    ours = tiny(arch, vocab)
    tuneforge.load_adapter(ours, adapter)
    torch.testing.assert_close(logits(peft_load(arch, vocab, adapter), ids, mask), logits(ours, ids, mask),
                               atol=1e-5, rtol=1e-5)
    trained = logits(trainer.model.eval(), ids, mask)  # the trained model, merged, computes what it did unmerged
    trainer.handle.merge()
    torch.testing.assert_close(logits(trainer.model, ids, mask), trained, atol=1e-4, rtol=1e-4)


def test_router_loss_is_the_models_own(tokenizer):
    """The monitor's loss equals the aux_loss transformers returns with output_router_logits."""
    from tuneforge.models.moe_router import RouterMonitor

    vocab = len(tokenizer)
    model = tiny("qwen3_moe", vocab)
    monitor = RouterMonitor(model)
    ids, mask = batch(vocab)
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert torch.allclose(monitor.take_loss(), model.router_aux_loss_coef * out.aux_loss)
    metrics = monitor.take_metrics()
    assert sum(metrics["expert_tokens"]) == int(mask.sum()) * 2 * 1  # one MoE layer, top-2, real tokens only
    assert RouterMonitor(tiny("llama", vocab)).take_loss() is None


def test_expert_lora_refuses_what_peft_cannot_load(tokenizer):
    with pytest.raises(ValueError, match="lora_dropout"):
        tuneforge.attach(tiny("mixtral", len(tokenizer)), LoRAConfig(r=2, lora_dropout=0.1))
    with pytest.raises(ValueError, match="use_dora"):
        tuneforge.attach(tiny("mixtral", len(tokenizer)), LoRAConfig(r=2, use_dora=True))
    # Without the experts, a Mixtral has no dense gate_proj: dropout and DoRA are fine there.
    tuneforge.attach(tiny("mixtral", len(tokenizer)), LoRAConfig(r=2, lora_dropout=0.1, target_experts=False))


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_a_trained_router_is_saved_as_peft_modules_to_save(arch, tokenizer, tmp_path):
    vocab = len(tokenizer)
    ids, mask = batch(vocab)
    model = tiny(arch, vocab)
    base = logits(model, ids, mask)
    handle = tuneforge.attach(model, LoRAConfig(r=2, train_router=True))
    routers = handle.router_layers()
    assert routers and all(p.requires_grad for _, r in routers for p in r.modules_to_save.parameters())
    assert not any(p.requires_grad for _, r in routers for p in r.original_module.parameters())
    with torch.no_grad():  # a router that has learnt something (B = 0 keeps the LoRA layers at the base)
        for _, router in routers:
            router.modules_to_save.weight.add_(torch.randn_like(router.modules_to_save.weight))
    ours = logits(model, ids, mask)
    assert (ours - base).abs().max() > 1e-3
    with handle.disabled():  # the reference model routes as the base did
        torch.testing.assert_close(logits(model, ids, mask), base)
    handle.save(tmp_path)
    torch.testing.assert_close(logits(peft_load(arch, vocab, tmp_path), ids, mask), ours, atol=1e-5, rtol=1e-5)
    reloaded = tiny(arch, vocab)
    tuneforge.load_adapter(reloaded, tmp_path)
    torch.testing.assert_close(logits(reloaded, ids, mask), ours)
    torch.testing.assert_close(logits(handle.merge_and_unload(), ids, mask), ours, atol=1e-5, rtol=1e-5)


def test_train_router_needs_a_router(tokenizer):
    with pytest.raises(ValueError, match="no mixture-of-experts router"):
        tuneforge.attach(tiny("llama", len(tokenizer)), LoRAConfig(r=2, train_router=True))


def test_qlora_adapts_float_experts_beside_4bit_layers_and_merges(tokenizer):
    pytest.importorskip("bitsandbytes")
    from tuneforge.methods.qlora import QLoRAConfig, merge_with_report

    model = tiny("qwen3_moe", len(tokenizer))
    handle = tuneforge.attach(model, QLoRAConfig(r=2, init_lora_weights=False, bnb_4bit_blocksize=32))
    assert handle.expert_layers()
    ids, mask = batch(len(tokenizer))
    merged, report = merge_with_report(handle, ids, mask)
    assert report["max_abs_diff"] < 1e-4
    assert not any(isinstance(m, LoRAExperts) for m in merged.modules())


@pytest.mark.parametrize("arch", MOE)
def test_recommend_counts_total_and_active_parameters(arch, tokenizer):
    from tuneforge.choose.recommend import estimate_step_seconds, format_report, recommend, shape_from_config

    vocab = len(tokenizer)
    model = tiny(arch, vocab)
    shape = shape_from_config(moe_config(arch, vocab), arch, ("full", "lora"))
    assert shape.params == sum(p.numel() for p in model.parameters())
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and m.gate_up_proj.dim() == 3]
    per_layer = sum(p.numel() for p in experts[0].parameters())
    assert shape.expert_params == per_layer * len(experts)
    # 4 experts, top-2: half of every MoE layer's experts sit idle for each token.
    assert shape.active_params == shape.params - shape.expert_params // 2
    with_experts = LoRAConfig().r * 2 * sum(sum(experts[0].gate_up_proj.shape[1:]) + sum(experts[0].down_proj.shape[1:])
                                            for _ in experts)  # r (in + out) per expert, 4 experts, both weights
    assert shape.trainable["lora"] > with_experts
    dense = copy.copy(shape)
    dense.active_params = None
    assert estimate_step_seconds(shape, "lora") < estimate_step_seconds(dense, "lora")
    assert f"{shape.active_params:,} active per token" in format_report(recommend(shape), shape, "CPU")


def test_cli_trains_an_moe_model_with_the_expert_and_router_flags(tokenizer, tmp_path):
    from tuneforge.commands.main import main

    model_dir = tmp_path / "qwen3-moe"
    tiny("qwen3_moe", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "data.jsonl", qa_rows(8))
    common = ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "1", "--batch-size", "4",
              "--device", "cpu", "--eval-generate", "false", "--general-eval", "none", "--lora-r", "2"]
    assert main([*common, "--output", str(tmp_path / "a"), "--lora-target-experts", "false",
                 "--lora-train-router", "true"]) == 0
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["model.layers.1.mlp.gate"]
    assert not any("experts" in p for p in saved["target_parameters"])  # only layer 0's dense MLP weights
    assert main([*common, "--output", str(tmp_path / "b")]) == 0
    saved = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert "model.layers.1.mlp.experts.gate_up_proj" in saved["target_parameters"] and not saved["modules_to_save"]
    assert main([*common, "--output", str(tmp_path / "c"), "--lora-dropout", "0.1"]) == 2  # PEFT could not load it


def test_gradient_checkpointing_counts_each_token_once(tokenizer):
    from tuneforge.models.moe_router import RouterMonitor

    vocab = len(tokenizer)
    ids, mask = batch(vocab)
    seen = []
    for checkpointing in (False, True):
        model = tiny("mixtral", vocab).train()
        tuneforge.attach(model, LoRAConfig(r=2))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        monitor = RouterMonitor(model)
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        seen.append((monitor.take_metrics()["expert_tokens"], float(monitor.take_loss())))
    assert seen[0] == seen[1]
    assert sum(seen[0][0]) == int(mask.sum()) * 2 * 2  # two MoE layers, top-2, real tokens only
