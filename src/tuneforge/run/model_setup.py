"""How the model is prepared for training beyond its method: activation checkpointing per block, compiled blocks,
whether batches can be packed; and what the run's memory peaked at."""

from __future__ import annotations

import copy
import logging
import sys

import torch
from torch import nn

from ..data.packing import model_packing_refusal
from ..methods.base import Method, MethodHandle
from ..objectives import Objective
from .distributed import Distributed, shard_model

log = logging.getLogger(__name__)


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference a full fine-tune keeps for DPO / PPO: it has no adapter to switch off."""
    log.info("full fine-tuning: keeping a frozen copy of the base model as the reference")
    reference = copy.deepcopy(model)
    reference.requires_grad_(False).eval()
    return reference


def upcast_trainable(method: type[Method], handle: MethodHandle) -> None:
    """As PEFT's autocast_adapter_dtype: adapters train in float32 even over a bf16 base (bf16 AdamW updates round
    small steps away). Full fine-tuning keeps the model's dtype."""
    if method.trains_base_weights:
        return
    for _, p in handle.float32_parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def wrap_for_ranks(dist: Distributed, model: nn.Module, reference: nn.Module | None, cpu_offload: bool) -> nn.Module:
    """The module the training forward goes through: DDP around ``model``, or ``model`` sharded in place by FSDP2
    (a frozen reference sharded the same way); one process: ``model`` itself."""
    if not dist.enabled:
        return model
    mixed = dist.shards and dist.device.type == "cuda" and torch.cuda.is_bf16_supported()
    if dist.shards and reference is not None:
        shard_model(reference, mixed_precision=mixed, cpu_offload=cpu_offload, forward_only=True)
    return dist.wrap(model, mixed_precision=mixed, cpu_offload=cpu_offload)


def checkpoint_blocks(model: nn.Module, every: int = 1) -> list[bool]:
    """Gradient checkpointing on every ``every``-th decoder block (transformers' per-layer switch), re-entrant-free so
    that frozen inputs and adapters work; returns which blocks recompute."""
    # transformers 5.24 renamed the switch (the old name warns); earlier releases have only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i % every == 0
    return [block.gradient_checkpointing for block in blocks]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks, in order (transformers' per-layer checkpointing unit)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every decoder block in place (``--compile``), with dynamic shapes: packed rows change width
    from step to step. The blocks share one graph, so the compile happens once. Returns the blocks compiled."""
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def packing_refusal(method: type[Method], objective: Objective, model: nn.Module) -> str | None:
    """Why a run of ``method`` and ``objective`` on ``model`` cannot pack several examples into a row, or None."""
    if not objective.packable:
        return f"the {objective.name} objective builds its own batches"
    if method.packing_refusal:
        return f"{method.name} cannot pack: {method.packing_refusal}"
    return model_packing_refusal(model)


def peak_memory(device: torch.device) -> dict[str, float]:
    """The run's peak memory so far, in MB, each number named for what it counts.

    ``peak_rss_mb``: the process's max resident set (``getrusage``'s ``ru_maxrss``), the "maximum resident set size"
    ``/usr/bin/time -v`` reports: model loading and the evaluations before and after training included. On CUDA also
    ``peak_cuda_allocated_mb`` (the most memory tensors held on ``device``) and ``peak_cuda_reserved_mb`` (the most
    the caching allocator held, closer to what nvidia-smi shows). ``peak_memory_mb`` stays for readers of earlier
    runs (compare, trackers): CUDA allocated on a GPU, the process max RSS otherwise."""
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(maxrss / (2**20 if sys.platform == "darwin" else 1024), 1)}  # bytes on macOS, KiB else
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    out["peak_memory_mb"] = out.get("peak_cuda_allocated_mb", out["peak_rss_mb"])
    return out


def memory_line(peak: dict[str, float]) -> str:
    """``peak_memory``'s numbers in words, for the log."""
    line = f"peak memory: process max RSS {peak['peak_rss_mb']:,.0f} MB"
    if "peak_cuda_allocated_mb" in peak:
        line += (f", CUDA max allocated {peak['peak_cuda_allocated_mb']:,.0f} MB, max reserved "
                 f"{peak['peak_cuda_reserved_mb']:,.0f} MB")
    return line
