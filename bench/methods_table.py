"""Every method on the same task, the same steps: what each costs and what each gains. One table.

    python bench/methods_table.py                      # the embedded SmolLM2 + the bundled demo task
    python bench/methods_table.py --steps 60 --methods lora,qlora,prompt_tuning --json bench/results/methods.json
    python bench/methods_table.py --steps 30 --methods lora+dora,lora+pissa      # a method plus options (VARIANTS)

Each method runs `tuneforge train` in a fresh subprocess (so peak memory is that run's alone), with the demo's
settings, a learning rate per method (`DEMO_LR`), AdaLoRA's schedule phases (`DEMO_OPTIONS`) and, for rows such
as ``lora+dora``, the variant's flags (`VARIANTS`), and reports:
trainable parameters, peak RSS (CPU) or peak CUDA memory, training tokens/s, wall time, final train loss and
held-out exact match after training (the base model's exact match is printed once, it is the same for every
method).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["full", "lora", "qlora", "adalora", "adapter", "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"]
# Peak learning rates for a short run (30-60 steps) on the demo task. The demo config's 1e-3 suits the LoRA
# family; full fine-tuning needs far less, soft prompts far more (each method's own default is for long runs).
# AdaLoRA's singular values start at zero, so its first updates are tiny: it needs a larger lr, and its budget
# schedule needs warm-up and final phases (PEFT's tinit = tfinal = 0 prune from the first step): with lr 2e-3 and
# those defaults it reached 34% in 30 steps, with the settings below 100%.
DEMO_LR = {"full": 5e-5, "lora": 1e-3, "qlora": 1e-3, "adalora": 1e-2, "adapter": 1e-3, "prompt_tuning": 3e-2,
           "p_tuning": 1e-2, "prefix_tuning": 5e-3, "p_tuning_v2": 1e-2}
DEMO_OPTIONS = {"adalora": ["--adalora-tinit", "10", "--adalora-tfinal", "10"]}
# Rows that are a method plus options ("METHOD+VARIANT" in --methods): the method's lr, then these flags.
VARIANTS = {"lora+dora": ["--lora-use-dora", "true"], "lora+pissa": ["--lora-init", "pissa"],
            "lora+olora": ["--lora-init", "olora"], "qlora+dora": ["--qlora-use-dora", "true"]}


def row_command(row: str) -> tuple[str, list[str]]:
    """The method a row trains and the flags that make it that row."""
    if "+" not in row:
        return row, DEMO_OPTIONS.get(row, [])
    if row not in VARIANTS:
        raise SystemExit(f"unknown row {row!r}: a method, or one of {', '.join(VARIANTS)}")
    method = row.split("+", 1)[0]
    return method, DEMO_OPTIONS.get(method, []) + VARIANTS[row]


def run_method(name: str, args: argparse.Namespace, out_root: Path) -> dict:
    method, options = row_command(name)
    output = out_root / name
    cmd = [sys.executable, "-m", "tuneforge.commands.main", "train", "--method", method, "--max-steps", str(args.steps),
           "--output", str(output), "--overwrite", "true", "--progress", "false", "--eval-limit", str(args.eval_limit)]
    if method in DEMO_LR and "--learning-rate" not in args.extra:
        cmd += ["--learning-rate", str(DEMO_LR[method])]
    cmd += options
    if args.device:
        cmd += ["--device", args.device]
    cmd += args.extra
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    row: dict = {"method": name, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        row["error"] = (stderr.strip().splitlines() or ["failed"])[-1][:200]
        return row
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    last_train = [m for m in metrics if "tokens_per_s" in m][-1]
    final = metrics[-1]
    for line in stdout.splitlines():
        if line.startswith("trainable parameters:"):
            row["trainable"] = int(line.split(":")[1].split("of")[0].replace(",", "").strip())
    row.update(tokens_per_s=last_train["tokens_per_s"], final_loss=round(last_train["loss"], 4),
               exact_match_before=final.get("exact_match_before"), exact_match_after=final.get("exact_match_after"))
    peak = _peak_memory_line(stderr)
    if peak:
        row["peak_mem_mb"] = peak
    return row


def _peak_memory_line(stderr: str) -> float | None:
    for line in reversed(stderr.splitlines()):
        if "peak memory" in line:
            try:
                return float(line.rsplit(":", 1)[1].split()[0])
            except (IndexError, ValueError):
                return None
    return None


def table(rows: list[dict]) -> str:
    head = "| method | trainable params | peak mem (MB) | train tokens/s | wall (s) | final loss | exact match after |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        em = r.get("exact_match_after")
        lines.append(f"| {r['method']} | {r.get('trainable', 0):,} | {r.get('peak_mem_mb', float('nan')):.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['wall_s']:.0f} | {r['final_loss']:.3f} | "
                     f"{'' if em is None else f'{em:.1%}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-limit", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default="runs/methods-table")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args, extra = parser.parse_known_args()
    args.extra = extra  # any further flag goes to every `tuneforge train` (e.g. --max-length 96)
    rows = []
    names = [name.strip() for name in args.methods.split(",")]
    for name in names:
        row_command(name)  # an unknown row fails now, not after the rows before it have trained
    for name in names:
        row = run_method(name, args, Path(args.output))
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    before = next((r["exact_match_before"] for r in rows if r.get("exact_match_before") is not None), None)
    print(f"{args.steps} steps each on the bundled demo task; base model exact match before training: "
          + ("n/a" if before is None else f"{before:.1%}"))
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
