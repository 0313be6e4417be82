"""Peak memory of one training step against sequence length, with and without ``--tiled-mlp`` (CPU).

A tiny-but-wide Llama (hidden 64, one head, MLP 4096 wide: 64x the hidden size, where Llama-3-8B's is 3.5x, so the
MLP's share of the activations that tiling removes is exaggerated to make it visible on a CPU), LoRA on every linear
layer, gradient checkpointing on (the long-context setting: the block being recomputed holds the peak), one
forward + backward of a single sequence of N tokens, every token supervised. Each point runs in a fresh process, so
its peak resident set (``ru_maxrss``) is its own; ``baseline_mb`` is the same process's RSS before the step
(interpreter, torch, model), ``step_mb`` = peak - baseline is what the step added.

    .venv/bin/python bench/bench_long_context.py                      # 4K..64K, ~20 min on one busy core
    .venv/bin/python bench/bench_long_context.py --lengths 4096,8192  # a quick look

Writes ``bench/results/long_context_cpu.json`` and ``.md`` (the table, with the ratio untiled / tiled per length).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=1,
             num_key_value_heads=1)
# meta-llama/Llama-3.1-8B's config.json (the fields that size memory): the GPU check's shape, random weights.
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
SHAPES = {"tiny-wide": SHAPE, "llama-3.1-8b": LLAMA_8B}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build_model(shape: str, length: int, device: str, method: str, rank: int):
    """A random-weight model of ``shape`` on ``device`` (bf16 on a GPU) with ``method`` (lora / qlora) attached."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import tuneforge

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=length, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    options = tuneforge.QLoRAConfig(r=rank) if method == "qlora" else tuneforge.LoRAConfig(r=rank)
    tuneforge.attach(model, options)
    return model.train(), config


def projected_mb(config, method: str, length: int, tiles: str | None, offload: bool) -> float:
    """tuneforge's long-context memory model for this point (GPU terms: bf16), for the table beside the measure."""
    from tuneforge.choose.long_context import LongContextSetup, long_context_breakdown
    from tuneforge.choose.recommend import shape_from_config

    shape = shape_from_config(config, "bench", ("full", "lora", "qlora"))
    setup = LongContextSetup(tiled_mlp=tiles is not None, offload_activations=offload)
    return sum(long_context_breakdown(shape, method, length, setup).values())


def one_point(length: int, tiles: str | None, checkpointing: bool, device: str = "cpu", shape: str = "tiny-wide",
              method: str = "lora", rank: int = 8, offload: bool = False) -> dict:
    """One forward + backward at ``length`` tokens in this process; the numbers of it."""
    import contextlib

    import torch

    from tuneforge.models.logprobs import token_cross_entropy_sum
    from tuneforge.models.tiled_mlp import tile_mlps
    from tuneforge.run.model_setup import checkpoint_blocks

    model, config = build_model(shape, length, device, method, rank)
    if tiles:
        tile_mlps(model, int(tiles) if tiles.isdigit() else tiles)
    if checkpointing:
        checkpoint_blocks(model)
    ids = torch.randint(4, config.vocab_size, (1, length), device=device)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    gpu = device.startswith("cuda")
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / 2**20 if gpu else current_rss_mb()
    saved = torch.autograd.graph.save_on_cpu(pin_memory=gpu) if offload else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        with saved:  # as the trainer's --offload-activations: what the forward saves goes to (pinned) CPU memory
            loss, _ = token_cross_entropy_sum(model, batch)
        loss.backward()
        if gpu:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"tokens": length, "tiled_mlp": tiles or "off", "offload": offload, "error": "out of memory",
                "projected_mb": round(projected_mb(config, method, length, tiles, offload)) if gpu else None}
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else rss_mb()
    row = {"tokens": length, "tiled_mlp": tiles or "off", "offload": offload, "gradient_checkpointing": checkpointing,
           "baseline_mb": round(baseline), "peak_rss_mb" if not gpu else "peak_cuda_allocated_mb": round(peak),
           "step_mb": round(peak - baseline), "seconds": round(seconds, 1), "tokens_per_s": round(length / seconds)}
    if gpu:
        row["peak_rss_mb"] = row["peak_cuda_allocated_mb"]  # the table's column: the device's peak on a GPU
        row["projected_mb"] = round(projected_mb(config, method, length, tiles, offload))
    return row


def run_point(length: int, tiles: str | None, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--point", str(length), "--tiles", tiles or "off", "--threads",
               str(args.threads), "--device", args.device, "--shape", args.shape, "--method", args.method, "--rank",
               str(args.rank)]
    command += ["--no-checkpointing"] if args.no_checkpointing else []
    command += ["--offload"] if args.offload else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"tokens": length, "tiled_mlp": tiles or "off", "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], gpu: bool) -> str:
    what = "peak CUDA allocated MB" if gpu else "peak RSS MB"
    by = {(r["tokens"], r["tiled_mlp"] != "off"): r for r in rows}
    lines = [f"| tokens | untiled {what} (step) | tiled {what} (step) | untiled / tiled (step) | untiled s | "
             "tiled s | tiled tokens/s |" + (" projected MB untiled / tiled |" if gpu else ""),
             "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for tokens in sorted({r["tokens"] for r in rows}):
        plain, tiled = by.get((tokens, False), {}), by.get((tokens, True), {})
        ratio = (f"{plain['step_mb'] / max(tiled['step_mb'], 1):.2f}x"
                 if "step_mb" in plain and "step_mb" in tiled else "-")
        cell = (lambda r: f"{r['peak_rss_mb']:,} ({r['step_mb']:,})" if "peak_rss_mb" in r else r.get("error", "-"))
        line = (f"| {tokens:,} | {cell(plain)} | {cell(tiled)} | {ratio} | {plain.get('seconds', '-')} | "
                f"{tiled.get('seconds', '-')} | {tiled.get('tokens_per_s', '-')} |")
        if gpu:
            line += f" {plain.get('projected_mb', '-')} / {tiled.get('projected_mb', '-')} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    parser.add_argument("--tiles", default="auto", help="--tiled-mlp setting of the tiled side (a count or auto)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--offload", action="store_true", help="both sides: --offload-activations (save_on_cpu)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="tiny-wide", choices=sorted(SHAPES))
    parser.add_argument("--method", default="lora", choices=["lora", "qlora"])
    parser.add_argument("--rank", type=int, default=8, help="LoRA r")
    parser.add_argument("--sides", default="untiled,tiled", help="untiled,tiled or one of them")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "long_context_cpu"))
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)  # internal: measure one point in this process
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    checkpointing = not args.no_checkpointing
    if args.point:
        tiles = None if args.tiles == "off" else args.tiles
        print(json.dumps(one_point(args.point, tiles, checkpointing, args.device, args.shape, args.method, args.rank,
                                   args.offload)))
        return 0
    sides = [None if side == "untiled" else args.tiles for side in args.sides.split(",")]
    rows = []
    for length in map(int, args.lengths.split(",")):
        for tiles in sides:
            rows.append(run_point(length, tiles, args))
            print(json.dumps(rows[-1]), flush=True)
    gpu = args.device.startswith("cuda")
    out = Path(args.output)
    meta = {"model": SHAPES[args.shape], "method": f"{args.method} r={args.rank} all-linear", "device": args.device,
            "gradient_checkpointing": checkpointing, "offload": args.offload, "threads": args.threads,
            "torch": torch.__version__, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    out.with_suffix(".md").write_text(
        f"One {args.method} r={args.rank} training step (forward + backward) of one sequence on {args.device}, model "
        f"{args.shape} {SHAPES[args.shape]}, gradient checkpointing {checkpointing}, offload {args.offload}, tiled "
        f"side --tiled-mlp {args.tiles}; `python bench/bench_long_context.py " + " ".join(sys.argv[1:]) + "`.\n\n"
        + table(rows, gpu) + "\n")
    print(table(rows, gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
