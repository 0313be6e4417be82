"""How long the ``tuneforge`` command takes to answer before it does any work, and which heavy libraries it loads.

    python bench/bench_startup.py                 # 5 runs of each command, fresh processes
    python bench/bench_startup.py --repeats 10 --json bench/results/startup.json
    python bench/bench_startup.py --src ../other-checkout/src     # another version of tuneforge, for comparison

Each command runs in a fresh interpreter (what a user typing it gets: nothing cached in the process), from this
checkout's ``src/`` (or ``--src``). The time is the subprocess's wall clock, start to exit; the interpreter alone
(``python -c pass``) is measured beside it, so the table shows what tuneforge adds. After the command returns, the
same process prints which of torch, transformers, datasets and matplotlib are in ``sys.modules``: ``--help`` and a
mistyped flag should load none of them (tests/test_cli.py asserts that; this script shows the time it buys).
``train --help`` is the contrast: it lists every method's and objective's options, so it loads the registries and
torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets", "matplotlib")
# Runs ``tuneforge ARGV`` in this process, then prints the heavy libraries it imported as the last line.
PROBE = ("import json, sys\nfrom tuneforge.commands.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
         "    pass\n"
         f"print(json.dumps(sorted(set({HEAVY!r}) & {{m.split('.')[0] for m in sys.modules}})))")
COMMANDS = {"python -c pass (the interpreter alone)": None, "tuneforge --help": ["--help"],
            "tuneforge --no-such-flag": ["--no-such-flag"], "tuneforge report --help": ["report", "--help"],
            "tuneforge train --help (lists the registries)": ["train", "--help"]}


def run_once(argv: list[str] | None, src: Path) -> tuple[float, list[str]]:
    """Wall seconds of one fresh process and the heavy libraries it imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", "pass"] if argv is None else [sys.executable, "-c", PROBE, *argv]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    lines = done.stdout.splitlines()
    return seconds, (json.loads(lines[-1]) if argv is not None else [])


def measure(repeats: int, src: Path) -> list[dict]:
    rows = []
    for name, argv in COMMANDS.items():
        run_once(argv, src)  # warm the OS file cache, as a second invocation by a user would find it
        times, heavy = [], []
        for _ in range(repeats):
            seconds, heavy = run_once(argv, src)
            times.append(seconds)
        rows.append({"command": name, "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                     "heavy_imported": heavy})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the tuneforge source to time (default: this "
                        "checkout's)")
    args = parser.parse_args()
    rows = measure(args.repeats, args.src.resolve())
    print(f"tuneforge from {args.src.resolve()}, {sys.executable}, {args.repeats} fresh processes per command")
    interpreter = rows[0]["median_s"]
    print(f"{'command':<48}{'median s':>10}{'min s':>8}{'x interpreter':>15}  heavy modules imported")
    for row in rows:
        heavy = ", ".join(row["heavy_imported"]) or "none"
        print(f"{row['command']:<48}{row['median_s']:>10.3f}{row['min_s']:>8.3f}"
              f"{row['median_s'] / interpreter:>15.1f}  {heavy}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
