"""Tiled MLP (``--tiled-mlp``): the same loss and the same gradients as the untiled model, on Llama (GQA) and Qwen2, for
full fine-tuning and LoRA (its dropout included: the recompute draws the same masks), alone and with gradient
checkpointing and activation offload; bad settings are one-line errors. Peak memory is measured in
bench/bench_long_context.py, not asserted here."""

from __future__ import annotations

import copy

import pytest
import torch

import tuneforge
from tuneforge.errors import ConfigError
from tuneforge.models.logprobs import token_cross_entropy_sum
from tuneforge.models.tiled_mlp import TiledForward, tile_bounds, tile_count, tile_mlps, untile_mlps
from tuneforge.run.model_setup import checkpoint_blocks

from conftest import make_tiny_model


def batch(vocab: int, rows: int = 2, length: int = 37) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def loss_and_grads(model, data, offload: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout draws for both models
    context = torch.autograd.graph.save_on_cpu() if offload else torch.enable_grad()
    with context:
        loss, _ = token_cross_entropy_sum(model, data)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("tiles", [3, "auto"])
def test_tiled_mlp_matches_untiled(arch, method, tiles, tokenizer):
    plain = make_tiny_model(arch, len(tokenizer)).train()
    if method == "lora":
        tuneforge.attach(plain, tuneforge.LoRAConfig(r=4, init_lora_weights=False))
    else:
        plain.requires_grad_(True)
    tiled = copy.deepcopy(plain)
    assert tile_mlps(tiled, tiles) == 2
    data = batch(len(tokenizer))
    assert_same(loss_and_grads(plain, data), loss_and_grads(tiled, data))


def test_dropout_draws_the_same_masks_in_the_recompute(tokenizer):
    """With LoRA dropout the tiles draw other masks than one untiled call would (a different shape of draws), but
    the backward recompute must draw the forward's: the gradients equal those of the same tiles kept whole."""
    from tuneforge.models.tiled_mlp import tile_bounds

    kept = make_tiny_model("llama", len(tokenizer)).train()
    tuneforge.attach(kept, tuneforge.LoRAConfig(r=4, lora_dropout=0.3, init_lora_weights=False))
    recomputed = copy.deepcopy(kept)
    tile_mlps(recomputed, 3)
    forward = type(kept.model.layers[0].mlp).forward
    for layer in kept.model.layers:  # the same tiles, autograd keeping every activation: no recompute
        def tiles_kept(x, mlp=layer.mlp):
            return torch.cat([forward(mlp, x[:, a:b]) for a, b in tile_bounds(x.shape[1], 3)], dim=1)

        layer.mlp.forward = tiles_kept
    data = batch(len(tokenizer))
    assert_same(loss_and_grads(kept, data), loss_and_grads(recomputed, data))


@pytest.mark.parametrize("offload", [False, True])
def test_tiled_mlp_composes_with_checkpointing_and_offload(offload, tokenizer):
    plain = make_tiny_model("llama", len(tokenizer)).train()
    tuneforge.attach(plain, tuneforge.LoRAConfig(r=4, init_lora_weights=False))
    tiled = copy.deepcopy(plain)
    tile_mlps(tiled, 4)
    checkpoint_blocks(tiled)
    data = batch(len(tokenizer))
    assert_same(loss_and_grads(plain, data), loss_and_grads(tiled, data, offload=offload))


def test_tiled_mlp_recomputes_in_tiles(tokenizer, monkeypatch):
    """The MLP runs once per tile in forward and once per tile again in backward: nothing of a tile outlives it."""
    model = make_tiny_model("llama", len(tokenizer)).train().requires_grad_(True)
    tile_mlps(model, 4)
    widths = []
    mlp = model.model.layers[0].mlp
    original = mlp.forward.original
    monkeypatch.setattr(mlp.forward, "original", lambda m, x: widths.append(x.shape[1]) or original(m, x))
    loss_and_grads(model, batch(len(tokenizer), length=37))
    assert widths == [9, 9, 9, 10] * 2


def test_untiled_again_and_inference_untouched(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    data = batch(len(tokenizer))
    with torch.no_grad():
        before = model(input_ids=data["input_ids"]).logits
        tile_mlps(model, 3)
        assert isinstance(model.model.layers[0].mlp.forward, TiledForward)
        torch.testing.assert_close(model(input_ids=data["input_ids"]).logits, before)
    untile_mlps(model)
    assert "forward" not in model.model.layers[0].mlp.__dict__


def test_tile_arithmetic():
    assert tile_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert tile_bounds(2, 5) == [(0, 1), (1, 2)]
    assert tile_count("auto", 4096, 1024) == 4 and tile_count("auto", 100, 1024) == 1
    assert tile_count(8, 5, 1024) == 5


@pytest.mark.parametrize("value", [0, -2, "many"])
def test_bad_tiled_mlp_setting_is_a_config_error(value):
    with pytest.raises(ConfigError, match="tiled_mlp"):
        tuneforge.load_config(None, {"tiled_mlp": value})


def test_tiled_mlp_from_the_cli(tiny_model_dir, tmp_path, sft_file):
    """End to end: `train --tiled-mlp auto` trains, records the setting, and resumes with it changed (memory for
    time: the same arithmetic)."""
    from tuneforge.commands.main import main

    args = ["train", "--model", str(tiny_model_dir), "--data", str(sft_file), "--output", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--progress", "false",
            "--eval-generate", "false", "--general-eval", "none", "--device", "cpu", "--tiled-mlp", "2"]
    assert main(args) == 0
    config = tuneforge.load_config(tmp_path / "run" / "tuneforge.yaml")
    assert config.tiled_mlp == 2
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(sft_file), "--tiled-mlp", "0"]) == 2


def test_model_without_block_mlp_is_refused(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    for layer in model.model.layers:
        layer.feed_forward = layer.mlp
        del layer.mlp
    with pytest.raises(ConfigError, match="no per-block `mlp`"):
        tile_mlps(model, 2)
