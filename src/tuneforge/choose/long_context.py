"""The longest context that fits: ``tuneforge recommend --max-length auto``.

One sequence of L tokens per optimiser micro-step (long-context training runs one row at a time), gradient
checkpointing on (without it every block keeps its activations and nothing long fits), on GPUs of a given memory. The
static part (weights, adapter or full training state, FSDP's gathered units) is ``recommend.memory_breakdown``'s at
one token; the part that grows with L is modelled here, per device, for T = L / context-parallel tokens:

* checkpointed block inputs: ``layers x hidden`` values per token (bf16) — zero on the GPU with
  ``--offload-activations``, which keeps them in pinned CPU memory;
* the one block being recomputed: ``ACT_HIDDEN x hidden`` values per token (attention through flash-attention or
  SDPA's memory-efficient kernel: linear in T) and the MLP's ``ACT_MLP x intermediate`` per token — only per
  ``hidden`` tokens (one tile) with ``--tiled-mlp auto``;
* Ulysses' all-to-all (``--context-parallel N``): query, key, value and output of H/N heads over the whole row, the
  same size as T tokens of all heads: ``4 x hidden`` per local token;
* the fused projection + cross-entropy: one float32 chunk of logits and the hidden states' float32 gradient.

These are projections of the same calibrated constants ``recommend`` uses, not measurements: bench/gpu_checks.sh
holds the commands that measure the longest context on a GPU beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .recommend import ACT_HIDDEN, ACT_MLP, ModelShape, memory_breakdown

HEADROOM = 0.9  # as recommend: 10% for the CUDA context, NCCL buffers and allocator fragmentation
STEP = 1024  # contexts are reported in multiples of this many tokens
BF16 = 2


@dataclass(frozen=True)
class LongContextSetup:
    """One way to train a long row: how many GPUs, split how, with which memory savers."""

    gpus: int = 1
    context_parallel: int = 1
    tiled_mlp: bool = False
    offload_activations: bool = False

    def label(self) -> str:
        parts = [f"{self.gpus} GPU" + ("s" if self.gpus > 1 else "")]
        parts += ["context parallel " + str(self.context_parallel)] if self.context_parallel > 1 else []
        parts += ["tiled MLP"] if self.tiled_mlp else []
        parts += ["offload"] if self.offload_activations else []
        return ", ".join(parts)

    def flags(self) -> str:
        flags = ["--gradient-checkpointing"]
        if self.gpus > 1:
            flags.insert(0, f"--nproc-per-node {self.gpus}")
        if self.context_parallel > 1:
            flags.append(f"--context-parallel {self.context_parallel}")
        if self.tiled_mlp:
            flags.append("--tiled-mlp auto")
        if self.offload_activations:
            flags.append("--offload-activations")
        return " ".join(flags)


def strategy(method_trains_base: bool, gpus: int) -> str | None:
    if gpus == 1:
        return None
    return "fsdp" if method_trains_base else "ddp"  # the trainer's default (RunConfig.distributed_strategy)


def long_context_breakdown(shape: ModelShape, method: str, tokens: int, setup: LongContextSetup) -> dict[str, float]:
    """What one GPU holds at the peak of a step on one row of ``tokens`` tokens, per component, in MB."""
    from ..methods.base import METHODS
    from ..models.linear_cross_entropy import CHUNK_BYTES

    full = METHODS.get(method).trains_base_weights
    static = memory_breakdown(shape, method, "sft", gpu=True, batch_size=1, max_length=1, gradient_checkpointing=True,
                              world_size=setup.gpus, strategy=strategy(full, setup.gpus))
    parts = {k: v for k, v in static.items() if k not in ("activations", "logits", "freed_in_backward")}
    local = tokens / setup.context_parallel
    mlp_tokens = min(local, shape.hidden) if setup.tiled_mlp else local
    mb = 2**20
    parts["checkpointed_inputs"] = 0.0 if setup.offload_activations else \
        local * shape.layers * shape.hidden * BF16 / mb
    block = local * ACT_HIDDEN * shape.hidden + mlp_tokens * ACT_MLP * shape.intermediate
    parts["block_recompute"] = block * BF16 / mb
    parts["all_to_all"] = local * 4 * shape.hidden * BF16 / mb if setup.context_parallel > 1 else 0.0
    parts["loss"] = (CHUNK_BYTES + local * shape.hidden * 4) / mb
    return parts


def offloaded_mb(shape: ModelShape, tokens: int, setup: LongContextSetup) -> float:
    """Pinned CPU memory one GPU's offloaded block inputs take (``--offload-activations``): the host must hold
    this times the GPUs of the node."""
    if not setup.offload_activations:
        return 0.0
    return tokens / setup.context_parallel * shape.layers * shape.hidden * BF16 / 2**20


def longest_context(shape: ModelShape, method: str, gpu_memory_mb: float, setup: LongContextSetup) -> int:
    """The most tokens (a multiple of ``STEP``, and of 2 x context-parallel) whose projected peak fits
    ``gpu_memory_mb`` with 10% headroom; 0 when not even ``STEP`` tokens fit."""
    budget = gpu_memory_mb * HEADROOM

    def fits(tokens: int) -> bool:
        return sum(long_context_breakdown(shape, method, tokens, setup).values()) <= budget

    if not fits(STEP):
        return 0
    low, high = 1, 2
    while fits(high * STEP) and high < 2**16:  # 64M tokens: nothing real fits more
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid * STEP) else (low, mid)
    return low * STEP


def setups(gpus: int) -> list[LongContextSetup]:
    """What to compare on ``gpus`` GPUs: plain checkpointing, tiled MLP, tiled + offload; with several GPUs also
    context parallel over all of them, with and without the savers."""
    out = [LongContextSetup(gpus), LongContextSetup(gpus, tiled_mlp=True),
           LongContextSetup(gpus, tiled_mlp=True, offload_activations=True)]
    if gpus > 1:
        out += [LongContextSetup(gpus, gpus), LongContextSetup(gpus, gpus, True, True)]
    return out


def longest_contexts(shape: ModelShape, methods: list[str], gpu_memory_mb: float, gpus: int,
                     heads: int | None = None) -> list[dict[str, Any]]:
    """A row per method x setup: the longest context and the peak it projects there. Context-parallel setups whose
    degree does not divide the heads (``heads``, when known) are left out, as the trainer refuses them."""
    rows = []
    for method in methods:
        for setup in setups(gpus):
            if heads and heads % setup.context_parallel:
                continue
            tokens = longest_context(shape, method, gpu_memory_mb, setup)
            peak = sum(long_context_breakdown(shape, method, max(tokens, STEP), setup).values())
            rows.append({"method": method, "setup": setup.label(), "flags": setup.flags(), "max_length": tokens,
                         "peak_mb": round(peak), "host_mb_per_gpu": round(offloaded_mb(shape, tokens, setup))})
    return rows


def format_longest(rows: list[dict[str, Any]], shape: ModelShape, hardware: str) -> str:
    lines = [f"model: {shape.name} ({shape.params:,} parameters), {hardware}; one row per step, gradient "
             "checkpointing on; projected, not measured",
             f"{'method':<10}{'setup':<46}{'longest context':>16}{'GPU peak':>13}{'host / GPU':>14}"]
    for r in rows:
        host = f"{r['host_mb_per_gpu'] / 1024:>11,.1f} GB" if r["host_mb_per_gpu"] else f"{'-':>14}"
        lines.append(f"{r['method']:<10}{r['setup']:<46}{r['max_length']:>16,}{r['peak_mb']:>10,} MB{host}")
    best = max(rows, key=lambda r: r["max_length"])
    lines += ["", f"longest: {best['max_length']:,} tokens with {best['method']} ({best['setup']}):",
              f"tuneforge train --model {shape.name} --method {best['method']} --max-length {best['max_length']} "
              f"--batch-size 1 {best['flags']} --data YOUR_LONG_DOCS.jsonl"]
    return "\n".join(lines)
