"""Eight LoRA configurations: side by side in one process vs eight runs one after another (issue 28, item 1).

    python bench/bench_multi_adapter.py                      # embedded SmolLM2-135M-Instruct, demo data, 20 steps
    python bench/bench_multi_adapter.py --steps 50 --with-evals --device cuda

Both sides are what a user types, each timed on the wall clock from the command's start to its exit:

* sequential: ``tuneforge train cfg_i.yaml`` eight times (each starts Python, loads the base, trains, saves);
* side by side: ``tuneforge train side.yaml`` once, the same eight configurations under ``adapters:``.

The eight configurations differ in rank (4, 8, 16, 32), learning rate (5e-4, 1e-3) and seed, on the bundled demo
task (batch 8, max_length 64). By default the evaluations are off on both sides (no eval loss, no exact-match
generation, no general-text perplexity), so the numbers compare training; ``--with-evals`` keeps the run defaults
(each adapter's after-training exact match is generated per adapter on both sides, so it narrows the ratio).

Printed: each side's seconds, the ratio (sequential / side by side; the goal is >= 3 on a CPU, >= 4 on a GPU), the
largest difference between an adapter's final train loss on the two sides (the same runs, to float rounding), and
the load average before and after (the machine is shared: a loaded machine slows both sides, not equally).
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

import yaml

REPO = Path(__file__).resolve().parents[1]
RANKS = (4, 8, 16, 32)
RATES = (5e-4, 1e-3)


def configurations() -> list[dict]:
    return [{"name": f"r{r}-lr{lr:g}", "lora_r": r, "lora_alpha": 2 * r, "learning_rate": lr, "seed": i}
            for i, (r, lr) in enumerate((r, lr) for r in RANKS for lr in RATES)]


def shared(args: argparse.Namespace) -> dict:
    values = {"model": args.model, "method": "lora", "objective": "sft", "max_steps": args.steps, "batch_size": 8,
              "max_length": args.max_length, "warmup_steps": 2, "progress": False, "overwrite": True}
    if args.device:
        values["device"] = args.device
    if not args.with_evals:
        values.update(eval_before=False, eval_generate=False, general_eval="none")
    return values


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return time.perf_counter() - start


def final_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-length", type=int, default=64, help="64 fits every demo example in SmolLM2's tokens")
    p.add_argument("--device")
    p.add_argument("--with-evals", action="store_true", help="keep the run defaults' evaluations on both sides")
    p.add_argument("--workdir", help="where the runs go (default: a temporary folder)")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-multi-adapter-"))
    work.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, "-m", "tuneforge", "train"]
    configs = configurations()
    load_before = os.getloadavg()

    side_file = work / "side.yaml"
    side_file.write_text(yaml.safe_dump({**shared(args), "output": str(work / "side"), "adapters": configs}))
    side_s = timed([*python, str(side_file)], env)

    sequential_s = 0.0
    for config in configs:
        entry = dict(config)
        name = entry.pop("name")
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**shared(args), **entry, "output": str(work / "sequential" / name)}))
        sequential_s += timed([*python, str(path)], env)

    load_after = os.getloadavg()
    diff = max(abs(final_loss(work / "side" / c["name"]) - final_loss(work / "sequential" / c["name"]))
               for c in configs)
    print(f"model {args.model}, {len(configs)} LoRA configurations, {args.steps} steps each, batch 8, "
          f"evals {'on' if args.with_evals else 'off'}, device {args.device or 'default'}")
    print(f"sequential ({len(configs)} x tuneforge train): {sequential_s:8.1f} s")
    print(f"side by side (1 x tuneforge train, adapters:): {side_s:8.1f} s")
    print(f"ratio sequential / side by side: {sequential_s / side_s:.2f}x")
    print(f"largest final train-loss difference between the sides: {diff:.2e}")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
