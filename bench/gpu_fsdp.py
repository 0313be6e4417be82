"""Measure one-rank FSDP2 against plain single-device training: per-GPU peak memory and tokens/s, full fine-tuning
and LoRA, on a Llama-3.2-1B-shaped model (random weights built from its config: nothing is downloaded), and set
each measured peak beside the memory model's projection (``tuneforge.choose.recommend.memory_breakdown``).

Each of the four runs (full / LoRA x single device / ``torchrun --nproc-per-node 1 --distributed fsdp``) is its own
process: ``tuneforge train`` with continued pretraining on the built-in general text, packed, so every row is
``--max-length`` supervised tokens, as the model assumes. Peak memory is the run's ``peak_memory_mb`` (CUDA
``max_memory_allocated``); tokens/s is measured over the steps after ``--warmup`` (first steps pay for CUDA and
allocator start-up). Writes ``bench/results/gpu_fsdp_<device>.json``.

    python bench/gpu_fsdp.py                                   # on a GPU machine: ~4 runs of under a minute
    python bench/gpu_fsdp.py --device cpu --model llama-tiny   # CPU smoke test of the script itself (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

from bench_lora import LLAMA_1B, LLAMA_TINY  # noqa: E402  (one home for the benchmark model shapes)

MODELS = {"llama-1b": LLAMA_1B, "llama-tiny": LLAMA_TINY}
METHODS = ("full", "lora")
MODES = ("single", "fsdp1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke test)")
    parser.add_argument("--model", default="llama-1b", choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=2, help="examples per step (one micro-batch)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output", help="JSON path (default bench/results/gpu_fsdp_<device>.json)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    return args


def build_model_dir(model: str, path: Path) -> Path:
    """A random-weight Llama from ``MODELS[model]`` and a small byte-level BPE tokenizer trained on the built-in
    general text (the model's vocabulary, larger, still sets the embedding and logits sizes)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from tuneforge.data.mixing import GENERAL_DIR

    texts = [json.loads(line)["text"] for line in (GENERAL_DIR / "train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    config = LlamaConfig(**MODELS[model], use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_command(args, model_dir: Path, method: str, mode: str, output: Path) -> list[str]:
    train = ["train", "--model", str(model_dir), "--method", method, "--objective", "pretrain", "--data", "general",
             "--general-eval", "none", "--eval-before", "false", "--eval-generate", "false", "--progress", "false",
             "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
             str(args.max_length), "--warmup-steps", "0", "--log-every", "1", "--device", args.device,
             "--output", str(output)]
    if mode == "single":
        return [sys.executable, "-m", "tuneforge", *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "tuneforge",
            *train, "--distributed", "fsdp"]


def steady_tokens_per_s(metrics_file: Path, warmup: int) -> float:
    """Tokens/s over the steps after ``warmup``: each record's cumulative tokens/s gives the time it ended at."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    steps = [r for r in records if "tokens" in r and "tokens_per_s" in r]
    cumulative, ends = 0, []
    for r in steps:
        cumulative += r["tokens"]
        ends.append((cumulative, cumulative / r["tokens_per_s"]))
    (tokens_a, time_a), (tokens_b, time_b) = ends[warmup - 1], ends[-1]
    return (tokens_b - tokens_a) / (time_b - time_a)


def run_one(args, model_dir: Path, method: str, mode: str, work: Path) -> dict:
    output = work / f"{method}-{mode}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(train_command(args, model_dir, method, mode, output), env=env, capture_output=True,
                          text=True, timeout=args.timeout)
    row = {"method": method, "mode": mode, "wall_s": round(time.perf_counter() - started, 1)}
    if done.returncode != 0:
        return {**row, "error": done.stderr[-2000:]}
    summary = json.loads((output / "summary.json").read_text())
    return {**row, "peak_memory_mb": summary["peak_memory_mb"],
            "tokens_per_s": round(steady_tokens_per_s(output / "metrics.jsonl", args.warmup), 1)}


def projected_mb(args, method: str, mode: str) -> float:
    from memory_projection import projected_peak_mb

    return projected_peak_mb(args.model, method, gpu=args.device.startswith("cuda"), batch_size=args.batch_size,
                             max_length=args.max_length, fsdp=mode == "fsdp1")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tuneforge-gpu-fsdp-"))
    model_dir = build_model_dir(args.model, work / "model")
    rows = []
    for method in args.methods.split(","):
        for mode in MODES:
            row = run_one(args, model_dir, method, mode, work)
            if "peak_memory_mb" in row:
                row["projected_mb"] = round(projected_mb(args, method, mode), 1)
                row["projected_over_measured"] = round(row["projected_mb"] / row["peak_memory_mb"], 3)
                print(f"{method:<5} {mode:<7} peak {row['peak_memory_mb']:>9.1f} MB  projected "
                      f"{row['projected_mb']:>9.1f} MB  {row['tokens_per_s']:>9.1f} tokens/s")
            else:
                print(f"{method:<5} {mode:<7} failed: {row['error']}")
            rows.append(row)
    import torch

    out = {"model": args.model, "device": args.device, "batch_size": args.batch_size, "max_length": args.max_length,
           "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "runs": rows}
    path = Path(args.output or BENCH / "results" / f"gpu_fsdp_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
                                                  ".json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
