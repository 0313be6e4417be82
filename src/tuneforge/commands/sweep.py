"""``tuneforge sweep``: parse the flags, run the search (``choose/sweep.py``), print each trial and the best one."""

from __future__ import annotations

import signal
import sys
from typing import Sequence

from ..choose.sweep import build_spec, parse_search_flags, run_sweep
from ..flags import parse_overrides


def cmd_sweep(args, extra: Sequence[str] = ()) -> int:
    extra = list(extra)
    config_path = extra.pop(0) if extra and not extra[0].startswith("-") else None
    spec = build_spec(config_path, parse_overrides(extra), parse_search_flags(args.search or []),
                      output=args.output, trials=args.trials, sampler=args.sampler, pruner=args.pruner,
                      objective=args.objective, direction=args.direction, seed=args.seed,
                      side_by_side=args.side_by_side)
    # A plain `kill` of the sweep stops its running trial too (the trial's process is stopped as the sweep unwinds).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    result = run_sweep(spec)
    for row in result["trials"]:
        value = "" if row["value"] is None else f" {spec.objective.text}={row['value']:.6g}"
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        note = " (interrupted, queued again)" if row.get("interrupted") else (f": {row['note']}" if row["note"] else "")
        print(f"trial {row['trial']}: {row['state']}{value} ({params}){note}")
    best = result["best"]
    if best is None:
        print("no trial completed")
        return 1
    print(f"best trial: {best['trial']} ({spec.objective.text}={best['value']:.6g}) -> {best['output']}")
    print(f"optuna-dashboard {result['storage']}")
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("sweep", help="search hyperparameters with Optuna (TPE or grid, pruning); each trial a run",
                       usage="tuneforge sweep [CONFIG.yaml] --search KEY=VALUES [--search ...] [--trials N] "
                       "[--objective METRIC] [any train flag]",
                       description="Every other flag is passed to each trial's `tuneforge train`. Rerun the same "
                       "command to continue a killed sweep (docs/sweep.md).")
    p.add_argument("--search", action="append", metavar="KEY=VALUES",
                   help="a config key and its candidates: 4,8,16 (choices), 1e-5..1e-3, log:1e-5..1e-3, int:2..32")
    p.add_argument("--trials", type=int, help="trials to finish (default: the grid's size, else 8)")
    p.add_argument("--sampler", choices=["tpe", "grid"], help="tpe (default) or grid (every combination)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"],
                   help="stop trials whose eval loss trails (default median)")
    p.add_argument("--objective", help="a summary metric (eval_loss, exact_match, preference_accuracy, forgetting) "
                   "or a weighted sum '0.7*exact_match - 0.3*forgetting' (default eval_loss)")
    p.add_argument("--direction", choices=["minimize", "maximize"], help="default: from the metric's name")
    p.add_argument("--seed", type=int, help="the sampler's seed (default 0)")
    p.add_argument("--output", help="the sweep folder (default runs/sweep)")
    p.add_argument("--side-by-side", type=int, metavar="K",
                   help="train K trials at a time as side-by-side LoRA adapters in one process (keys LoRA lanes may "
                   "differ in only; trials of a batch are not pruned one by one)")
    p.set_defaults(func=cmd_sweep, passthrough=True)


