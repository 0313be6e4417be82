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


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_point(length: int, tiles: str | None, checkpointing: bool) -> dict:
    """One forward + backward at ``length`` tokens in this process; the numbers of it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import tuneforge
    from tuneforge.models.logprobs import token_cross_entropy_sum
    from tuneforge.models.tiled_mlp import tile_mlps
    from tuneforge.run.model_setup import checkpoint_blocks

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE, max_position_embeddings=length,
                                                         attn_implementation="sdpa"))
    model.config.use_cache = False
    tuneforge.attach(model, tuneforge.LoRAConfig(r=8))
    model.train()
    if tiles:
        tile_mlps(model, int(tiles) if tiles.isdigit() else tiles)
    if checkpointing:
        checkpoint_blocks(model)
    ids = torch.randint(4, SHAPE["vocab_size"], (1, length))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    baseline = current_rss_mb()
    start = time.perf_counter()
    loss, _ = token_cross_entropy_sum(model, batch)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = rss_mb()
    return {"tokens": length, "tiled_mlp": tiles or "off", "gradient_checkpointing": checkpointing,
            "baseline_mb": round(baseline), "peak_rss_mb": round(peak), "step_mb": round(peak - baseline),
            "seconds": round(seconds, 1)}


def run_point(length: int, tiles: str | None, checkpointing: bool, threads: int) -> dict:
    args = [sys.executable, __file__, "--point", str(length), "--tiles", tiles or "off", "--threads", str(threads)]
    if not checkpointing:
        args.append("--no-checkpointing")
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        return {"tokens": length, "tiled_mlp": tiles or "off", "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    by = {(r["tokens"], r["tiled_mlp"] != "off"): r for r in rows}
    lines = ["| tokens | untiled peak RSS MB (step) | tiled peak RSS MB (step) | untiled / tiled (step) | "
             "untiled s | tiled s |", "|---:|---:|---:|---:|---:|---:|"]
    for tokens in sorted({r["tokens"] for r in rows}):
        plain, tiled = by.get((tokens, False), {}), by.get((tokens, True), {})
        ratio = (f"{plain['step_mb'] / max(tiled['step_mb'], 1):.2f}x"
                 if "step_mb" in plain and "step_mb" in tiled else "-")
        cell = (lambda r: f"{r['peak_rss_mb']:,} ({r['step_mb']:,})" if "peak_rss_mb" in r else r.get("error", "-"))
        lines.append(f"| {tokens:,} | {cell(plain)} | {cell(tiled)} | {ratio} | {plain.get('seconds', '-')} | "
                     f"{tiled.get('seconds', '-')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    parser.add_argument("--tiles", default="auto", help="--tiled-mlp setting of the tiled side (a count or auto)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "long_context_cpu"))
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)  # internal: measure one point in this process
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    checkpointing = not args.no_checkpointing
    if args.point:
        tiles = None if args.tiles == "off" else args.tiles
        print(json.dumps(one_point(args.point, tiles, checkpointing)))
        return 0
    rows = []
    for length in map(int, args.lengths.split(",")):
        for tiles in (None, args.tiles):
            rows.append(run_point(length, tiles, checkpointing, args.threads))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.output)
    meta = {"model": SHAPE, "method": "lora r=8 all-linear", "gradient_checkpointing": checkpointing,
            "threads": args.threads, "torch": torch.__version__, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    out.with_suffix(".md").write_text(f"Peak RSS of one LoRA training step (forward + backward) of one sequence, "
                                      f"CPU, model {SHAPE}, gradient checkpointing {checkpointing}, tiled side "
                                      f"--tiled-mlp {args.tiles}; `python bench/bench_long_context.py`.\n\n"
                                      + table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
