"""Serving many adapters over one base vs one merged model per adapter: requests/s and p50 / p95 latency.

    python bench/bench_serve.py                                   # CPU, the embedded SmolLM2-135M, 8 LoRA adapters
    python bench/bench_serve.py --device cuda --requests 256 --concurrency 64 --max-batch-size 32

Three rows, the same requests (greedy, ``--max-tokens`` new tokens, prompts spread evenly over the adapters), sent
by ``--concurrency`` client threads through the official ``openai`` client to a live ``tuneforge serve`` app on
loopback:

* ``1 adapter``: one base + one LoRA adapter, every request for it;
* ``8 adapters``: one base + 8 LoRA adapters, requests spread over all 8 (rows for different adapters share a
  forward: per-row LoRA selection);
* ``merged, one at a time``: per adapter, a merged model served alone, its share of the requests sent
  concurrently, then the next model (model loading and merging are not timed: the row is the serving time only).

Adapters are random (r=16, all-linear, non-zero B), so outputs differ per adapter; speed does not depend on values.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "serve"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "The three primary colours are",
           "To make a cup of tea, first", "In 1969, astronauts", "The quickest way to learn a language is"]


def make_adapters(model, n: int, root: Path, r: int) -> dict[str, Path]:
    import torch

    import tuneforge as tf

    dirs = {}
    for i in range(n):
        torch.manual_seed(i)
        handle = tf.attach(copy.deepcopy(model), tf.LoRAConfig(r=r, target_modules="all-linear",
                                                               init_lora_weights=False))
        with torch.no_grad():
            for _, p in handle.trainable_parameters():
                p.mul_(0.1)  # a modest update: the model still writes text
        dirs[f"lora-{i}"] = handle.save(root / f"lora-{i}")
    return dirs


def fire(url: str, jobs: list[tuple[str, str]], args) -> tuple[float, list[float], int]:
    """Send ``jobs`` (model, prompt) concurrently; (wall seconds, per-request latencies, completion tokens)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    def one(job):
        start = time.perf_counter()
        out = client.completions.create(model=job[0], prompt=job[1], max_tokens=args.max_tokens, temperature=0)
        return time.perf_counter() - start, out.usage.completion_tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(pool.map(one, jobs))
    return time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results)


def serve_and_fire(model, tokenizer, adapters: dict, jobs, args):
    from conftest import LiveServer

    from tuneforge.serve.app import create_app

    app = create_app(model, tokenizer, "base", {k: str(v) for k, v in adapters.items()},
                     max_queue=args.requests, max_batch_size=args.max_batch_size)
    with LiveServer(app) as live:
        fire(live.url, jobs[: args.max_batch_size], args)  # warm-up (first-call overheads), not timed
        return fire(live.url, jobs, args)


def row(name: str, wall: float, latencies: list[float], tokens: int) -> dict:
    q = statistics.quantiles(latencies, n=20)
    return {"setup": name, "requests": len(latencies), "req_per_s": len(latencies) / wall,
            "tok_per_s": tokens / wall, "p50_s": statistics.median(latencies), "p95_s": q[18], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--output", help="write the table (markdown) here too")
    args = p.parse_args()

    import torch

    from tuneforge.inference.loading import load_for_inference

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_for_inference(args.model, None, device=args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(model, args.adapters, Path(tmp), args.r)
        names = list(dirs)
        spread = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
        single = [(names[0], prompt) for _, prompt in spread]
        rows.append(row("1 adapter, one base", *serve_and_fire(model, tokenizer, {names[0]: dirs[names[0]]},
                                                               single, args)))
        rows.append(row(f"{len(names)} adapters, one base", *serve_and_fire(model, tokenizer, dirs, spread, args)))
        wall, latencies, tokens, loading = 0.0, [], 0, 0.0
        for name in names:  # one merged model per adapter, served one at a time
            start = time.perf_counter()
            merged, tok, handle = load_for_inference(args.model, dirs[name], device=args.device)
            merged = handle.merge_and_unload()
            loading += time.perf_counter() - start
            jobs = [("base", prompt) for adapter, prompt in spread if adapter == name]
            w, lat, t = serve_and_fire(merged, tok, {}, jobs, args)
            wall, latencies, tokens = wall + w, latencies + lat, tokens + t
        rows.append(row(f"merged, {len(names)} models one at a time", wall, latencies, tokens))
        rows[-1]["load_s"] = loading
    header = (f"model {args.model}, device {args.device} ({args.threads} threads), {args.requests} requests, "
              f"concurrency {args.concurrency}, max batch {args.max_batch_size}, {args.max_tokens} new tokens, "
              f"LoRA r={args.r} all-linear\n\n")
    table = "| setup | req/s | tok/s | p50 latency (s) | p95 latency (s) | wall (s) |\n|---|---|---|---|---|---|\n"
    table += "".join(f"| {r['setup']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | {r['p50_s']:.2f} | "
                     f"{r['p95_s']:.2f} | {r['wall_s']:.1f} |\n" for r in rows)
    table += (f"\nThe merged row's wall time excludes loading and merging its {len(names)} models "
              f"({loading:.1f} s in all), and needs {len(names)} model copies to avoid that cost; the one-base rows "
              "hold one base plus the adapters.\n")
    print(header + table)
    if args.output:
        Path(args.output).write_text(header + table)


if __name__ == "__main__":
    main()
