"""QLoRA vs LoRA in tuneforge: what the 4-bit base saves in memory and costs in speed. Side by side, one run.

    python bench/bench_qlora.py --device cuda --model llama-1b-random --seq-len 2048 --batch-size 4 --steps 10
    python bench/bench_qlora.py --device cpu --model llama-tiny-random --steps 3      # a smoke test

Each side runs in a fresh subprocess (so peak memory is its own): the same model, batches, LoRA (r, alpha,
all-linear) and AdamW; QLoRA quantises the frozen base to NF4 with double quantisation (bitsandbytes) and
trains the adapters in float32 over a bf16 compute dtype, LoRA keeps the base in bf16 (fp32 on CPU).
Printed: memory after setup (weights), peak memory in training, tokens/s, final loss, and QLoRA/LoRA ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_lora as common  # noqa: E402  (model and batch builders shared with the LoRA benchmark)


def run_worker(args) -> dict:
    import torch

    common.import_tuneforge()
    import tuneforge as tf
    from tuneforge.methods.qlora import QLoRAConfig
    from tuneforge.objectives import TrainContext, get_objective

    cuda = args.device == "cuda"
    model, tokenizer = common.build_model(args)
    lora = dict(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    if args.worker == "qlora":
        compute = "bfloat16" if cuda else "float32"
        handle = tf.attach(model, QLoRAConfig(**lora, bnb_4bit_compute_dtype=compute))
    else:
        handle = tf.attach(model, tf.LoRAConfig(**lora))
    for _, p in handle.trainable_parameters():  # as the trainer: adapters train in float32
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    after_setup = torch.cuda.memory_allocated() / 2**20 if cuda else common.read_proc_status_kb("VmRSS") / 1024
    objective = get_objective("sft")(tokenizer)
    ctx = TrainContext(handle=handle)
    params = [p for _, p in handle.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    batches = common.make_batches(args, model.config.vocab_size)
    times, losses, tokens = [], [], 0
    model.train()
    for i, batch in enumerate(batches):
        batch = {k: v.to(args.device) for k, v in batch.items()}
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_sum, _ = objective.loss(model, batch, ctx)
        loss = loss_sum / objective.units(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens += int(batch["attention_mask"].sum())
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else common.read_proc_status_kb("VmHWM") / 1024
    return {"side": args.worker, "memory_after_setup_mb": round(after_setup, 1), "peak_memory_mb": round(peak, 1),
            "tokens_per_s": round(tokens / sum(times), 1), "median_step_s": sorted(times)[len(times) // 2],
            "final_loss": losses[-1], "trainable": handle.num_trainable_parameters(),
            "total_params": handle.num_total_parameters()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--model", choices=("llama-1b-random", "llama-tiny-random", "smollm2-135m-instruct"),
                   default="llama-1b-random")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--worker", choices=("lora", "qlora"), help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    # build_model / make_batches read these from the LoRA benchmark's arguments
    args.dtype, args.supervised_fraction, args.min_length_fraction = "auto", 0.25, 1.0
    if args.worker:
        Path(args.result_file).write_text(json.dumps(run_worker(args)))
        return 0
    results = {}
    for side in ("lora", "qlora"):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", side, "--result-file", f.name],
                           check=True)
            results[side] = json.loads(Path(f.name).read_text())
    lora, qlora = results["lora"], results["qlora"]
    print(f"model {args.model} on {args.device}, batch {args.batch_size} x seq {args.seq_len}, LoRA r={args.r} "
          f"all-linear, {args.warmup} warm-up + {args.steps} timed steps")
    print("| | LoRA | QLoRA (NF4, double quant) | QLoRA / LoRA |\n|---|---:|---:|---:|")
    for key, label in (("memory_after_setup_mb", "memory after setup, MB"), ("peak_memory_mb", "peak memory, MB"),
                       ("tokens_per_s", "tokens/s"), ("median_step_s", "median step, s"),
                       ("final_loss", "final loss"), ("trainable", "trainable parameters")):
        ratio = qlora[key] / lora[key] if lora[key] else float("nan")
        print(f"| {label} | {lora[key]:.4g} | {qlora[key]:.4g} | {ratio:.3f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
