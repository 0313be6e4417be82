"""Measure training peak memory per method on the embedded model and set it beside `tuneforge recommend`'s estimate.

Runs ``tuneforge compare`` (each method in its own process, so each peak is that method's alone) with continued
pretraining on the built-in general text: packing makes every block exactly ``--max-length`` tokens, so the
estimate's token count is the trained one. Writes ``bench/results/memory_calibration_<device>.json`` with the
settings, each method's measured peak (``peak_memory_mb`` of its summary: process peak RSS on CPU, CUDA allocated
on GPU) and the estimate; ``tests/test_recommend.py`` holds the estimates to 20% of these measurements.

    .venv/bin/python bench/memory_calibration.py --device cpu          # ~2-5 minutes on a 2-core CPU
    python bench/memory_calibration.py --device cuda --gpu-memory 80GB  # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--methods", default="lora,qlora,full,prompt_tuning")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output", help="JSON path (default bench/results/memory_calibration_<device>.json)")
    args = parser.parse_args()

    from tuneforge.choose.recommend import estimate_memory_mb, model_shape

    work = Path(tempfile.mkdtemp(prefix="tuneforge-calibration-"))
    settings = ["--model", args.model, "--objective", "pretrain", "--data", "general", "--max-steps", "2",
                "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--eval-before", "false",
                "--eval-generate", "false", "--general-eval", "none", "--device", args.device]
    subprocess.run([sys.executable, "-m", "tuneforge", "compare", "--methods", args.methods, "--output", str(work),
                    *settings], check=False)
    rows = json.loads((work / "compare.json").read_text())
    shape = model_shape(args.model, tuple(args.methods.split(",")))
    gpu = args.device.startswith("cuda")
    out = {"settings": settings, "model_params": shape.params, "methods": {}}
    for row in rows:
        if "peak_memory_mb" not in row:
            print(f"{row['method']}: failed: {row.get('error')}")
            continue
        estimate = estimate_memory_mb(shape, row["method"], "pretrain", gpu=gpu, batch_size=args.batch_size,
                                      max_length=args.max_length)
        out["methods"][row["method"]] = {"measured_mb": row["peak_memory_mb"], "estimated_mb": round(estimate, 1),
                                         "ratio": round(estimate / row["peak_memory_mb"], 3)}
        print(f"{row['method']:<15} measured {row['peak_memory_mb']:>8.0f} MB  estimated {estimate:>8.0f} MB  "
              f"ratio {estimate / row['peak_memory_mb']:.2f}")
    path = Path(args.output or ROOT / "bench" / "results" / f"memory_calibration_{'cuda' if gpu else 'cpu'}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
