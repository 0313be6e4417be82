"""Optional GPU kernels (models/kernels.py): used only on CUDA and only when installed, named in the run summary; a run
without them (every CPU run) says so."""

from __future__ import annotations

import importlib.util

import torch

from tuneforge.models import kernels


def pretend_installed(monkeypatch, *modules: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in modules else real(name, *a))
    monkeypatch.setattr(kernels.importlib.metadata, "version", lambda dist: "9.9")


def test_kernels_are_used_on_cuda_only_and_flash_attention_needs_half_precision(monkeypatch):
    pretend_installed(monkeypatch, "flash_attn", "liger_kernel")
    assert kernels.installed() == {"flash_attn": "9.9", "liger_kernel": "9.9"}
    assert kernels.usable("cpu") == {}
    assert kernels.usable("cuda:0") == {"flash_attn": "9.9", "liger_kernel": "9.9"}
    assert kernels.attention_implementation("cuda", torch.bfloat16) == "flash_attention_2"
    assert kernels.attention_implementation("cuda", torch.float32) is None  # flash-attn has no float32 kernels
    assert kernels.attention_implementation("cpu", torch.bfloat16) is None


def test_a_liger_release_that_cannot_patch_the_model_leaves_it_alone(monkeypatch, caplog):
    pretend_installed(monkeypatch, "liger_kernel")
    model = torch.nn.Linear(2, 2)
    # liger_kernel is not really importable here: the import fails inside apply_liger, as a moved API would.
    assert kernels.apply_liger(model, "cuda") is False
    assert "liger-kernel left unused" in caplog.text
    assert kernels.apply_liger(model, "cpu") is False


def test_the_run_summary_names_packing_attention_and_kernels(tmp_path, tiny_model_dir, sft_file):
    import tuneforge

    result = tuneforge.train(tuneforge.load_config(None, dict(
        model=str(tiny_model_dir), data=str(sft_file), max_steps=1, batch_size=2, output=str(tmp_path / "run"),
        eval_generate=False, progress=False, general_eval="none")))
    assert result.metrics["packing"] is True
    assert result.metrics["attention"] == "sdpa"
    assert result.metrics["kernels"] == {}  # a CPU run uses none, installed or not
