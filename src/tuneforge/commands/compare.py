"""``tuneforge compare --methods lora,dora,... [train flags]``: several methods trained the same way on the user's
data, K seeds each; a table with intervals, a verdict and a chart (``choose/compare.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..choose.compare import SUMMARY_FILE, compare


def cmd_compare(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods: give at least one method, e.g. --methods lora,qlora,adapter")
    rows = compare(methods, list(extra), args.output, overwrite=args.overwrite, seeds=args.seeds,
                   budget_tokens=args.budget_tokens)
    output = Path(args.output)
    print((output / "compare.md").read_text(), end="")
    print(f"written: {output / 'compare.md'}, {output / 'compare.json'}, {output / SUMMARY_FILE}"
          + (f", {output / 'compare.png'}" if (output / "compare.png").exists() else ""))
    return 1 if any("error" in r for r in rows) else 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("compare", help="train several methods the same way on your data; a table and a chart of "
                       "gain vs cost", usage="tuneforge compare --methods lora,qlora,... [--output DIR] "
                       "[any train flag: --data mine.jsonl --eval-data held.jsonl --max-steps 50 ...]",
                       description="Every other flag is passed to each method's `tuneforge train` unchanged; a "
                       "method's own options (--lora-r 4) to that method only. Rerun the same command to continue a "
                       "killed compare: methods finished with the same settings and data are read back.")
    p.add_argument("--methods", required=True, help="comma-separated: lora,qlora,adapter,prompt_tuning,...")
    p.add_argument("--output", default="runs/compare", help="the compare directory (runs/METHOD/seed-N inside)")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, seeds --seed, --seed + 1, ... (default 3): "
                   "the table gives each quantity's mean and bootstrap 95%% interval, the verdict which methods the "
                   "intervals cannot tell apart; 1 for a quick look without either")
    p.add_argument("--budget-tokens", type=int, help="equal budget: every method trains on this many training "
                   "tokens (per seed, the steps that hold them; instead of --max-steps / --epochs)")
    p.add_argument("--overwrite", action="store_true", help="train again the methods whose settings or data "
                   "changed (refused without it), every method when none did; also: use an output folder that holds "
                   "something else")
    p.set_defaults(func=cmd_compare, passthrough=True)
