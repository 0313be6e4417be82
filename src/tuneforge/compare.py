"""``tuneforge compare``: train several methods the same way on the user's data and set gain against cost.

Each method runs ``tuneforge train`` in its own process (so peak memory is that method's alone, and one method
crashing cannot take the others with it), with the same flags, into ``OUTPUT/runs/METHOD``. After every method
the table is rewritten — ``compare.md``, ``compare.json`` and ``compare.png`` (gain vs trainable parameters,
peak memory and wall time) — so a killed compare loses at most the method it was running; run the same command
again and methods already finished are read back, not retrained (one killed mid-run resumes from its last
checkpoint when ``--save-every`` wrote one).

Gain is the held-out loss the run removed (``eval loss before - after``); exact match (chat data), preference
accuracy (pairs) and forgetting (general-text loss after - before, see ``--general-eval``) sit beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .checkpoint import latest_checkpoint, read_run_record, write_text_atomic
from .report import plain_log_labels

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"  # written by trainer.train() into every finished run
WALL_NAME = "compare_wall.json"  # the wall time compare measured for a method, kept beside its run

# (column, title, format) for the table; a column no method has is left out.
COLUMNS = [("method", "method", "{}"), ("trainable_params", "trainable params", "{:,}"),
           ("trainable_percent", "% trainable", "{:.3f}"), ("peak_memory_mb", "peak MB", "{:,.0f}"),
           ("wall_s", "wall s", "{:.1f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
           ("eval_before_loss", "eval loss before", "{:.4f}"), ("eval_loss", "eval loss after", "{:.4f}"),
           ("gain", "gain (loss drop)", "{:+.4f}"), ("eval_before_accuracy", "pair acc. before", "{:.1%}"),
           ("eval_accuracy", "pair acc. after", "{:.1%}"), ("exact_match_before", "exact match before", "{:.1%}"),
           ("exact_match_after", "exact match after", "{:.1%}"), ("general_ppl_before", "general ppl before",
                                                                  "{:.3f}"),
           ("general_ppl_after", "general ppl after", "{:.3f}"), ("forgetting", "forgetting", "{:+.4f}"),
           ("error", "error", "{}")]

Runner = Callable[[list[str]], tuple[int, str]]


def run_subprocess(args: list[str]) -> tuple[int, str]:
    """Run ``python -m tuneforge ARGS``; its exit status and the tail of what it wrote to stderr."""
    proc = subprocess.run([sys.executable, "-m", "tuneforge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    sys.stdout.write(proc.stdout)
    return proc.returncode, proc.stderr[-2000:]


def finished(run_dir: Path) -> bool:
    record = read_run_record(run_dir)
    return bool(record and record.get("finished")) and (run_dir / SUMMARY_NAME).is_file()


def train_args(method: str, run_dir: Path, flags: list[str]) -> list[str]:
    """The method's ``tuneforge train`` command line: the shared flags, then its method and output. A run killed
    after a checkpoint resumes; one killed before any starts over."""
    again = ["--resume"] if latest_checkpoint(run_dir) is not None else ["--overwrite"]
    return ["train", *flags, "--method", method, "--output", str(run_dir), "--progress", "false", *again]


def compare(methods: list[str], flags: list[str], output: str | Path, runner: Runner = run_subprocess
            ) -> list[dict[str, Any]]:
    """Train each method (skipping finished ones), rewriting the report after each; the rows, in order."""
    from .methods.base import METHODS

    names = [METHODS.get(m).name for m in methods]  # an unknown method fails before anything runs
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {', '.join(methods)}")
    output = Path(output)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        run_dir = output / "runs" / name
        if finished(run_dir):
            log.info("compare: %s already finished in %s; reading it back", name, run_dir)
        else:
            log.info("compare: training %s -> %s", name, run_dir)
            start = time.perf_counter()
            code, err = runner(train_args(name, run_dir, flags))
            if code != 0:
                rows.append({"method": name, "error": _last_error_line(err)})
                write_report(rows, output)
                continue
            (run_dir / WALL_NAME).write_text(json.dumps({"wall_s": round(time.perf_counter() - start, 2)}))
        rows.append(read_row(name, run_dir))
        write_report(rows, output)
    return rows


def _last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed (no message)"


def read_row(method: str, run_dir: Path) -> dict[str, Any]:
    """One table row from a finished run's summary.json (and the wall time compare measured)."""
    m = json.loads((run_dir / SUMMARY_NAME).read_text())
    row: dict[str, Any] = {"method": method, "run": str(run_dir)}
    for key, *_ in COLUMNS[1:]:
        if key in m and isinstance(m[key], (int, float)):
            row[key] = m[key]
    if m.get("total_params"):
        row["trainable_percent"] = 100 * m["trainable_params"] / m["total_params"]
    wall = run_dir / WALL_NAME
    if wall.is_file():
        row["wall_s"] = json.loads(wall.read_text())["wall_s"]
    if "eval_before_loss" in row and "eval_loss" in row:
        row["gain"] = row["eval_before_loss"] - row["eval_loss"]
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The costs the chart sets gain against: (row key, axis label, log scale).
CHART_COSTS = [("trainable_params", "trainable parameters", True),
               ("peak_memory_mb", "peak memory, MB (GPU: CUDA max allocated; CPU: process max RSS)", False),
               ("wall_s", "wall time (s)", False)]
MARKERS = "osD^v<>ph*"  # with ten colours: a hundred methods told apart


def draw_chart(rows: list[dict[str, Any]]):
    """Gain against each cost, one point per method in the same colour and marker in every panel, named in one
    legend below: names written beside the points overlapped where methods cost about the same (memory). None when
    no method has a gain."""
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend
    from matplotlib.lines import Line2D

    done = [r for r in rows if "gain" in r]
    if not done:
        return None
    styles = {r["method"]: dict(color=f"C{i % 10}", marker=MARKERS[i // 10 % len(MARKERS)]) for i, r in enumerate(done)}
    fig = Figure(figsize=(5 * len(CHART_COSTS), 4.6), layout="constrained")
    for ax, (key, label, log_scale) in zip(fig.subplots(1, len(CHART_COSTS)), CHART_COSTS):
        points = [r for r in done if key in r and r[key] > 0]
        for r in points:
            ax.scatter([r[key]], [r["gain"]], s=45, alpha=0.8, label=r["method"], **styles[r["method"]])
        if log_scale and points:
            ax.set_xscale("log")
            plain_log_labels(ax.xaxis, [r[key] for r in points], label=_count)
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("gain: held-out loss drop")
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], linestyle="none", markersize=7, label=name, **style) for name, style in styles.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), frameon=False)
    fig.suptitle("gain vs cost per method (up and to the left is better)")
    return fig


def _count(value: float) -> str:
    """4000 → "4k", 1.5e6 → "1.5M": a parameter count as an axis label."""
    for suffix, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """``draw_chart`` as a PNG at ``path``; None when there is nothing to draw."""
    fig = draw_chart(rows)
    if fig is None:
        return None
    fig.savefig(path, dpi=100, format="png")
    return path


def write_report(rows: list[dict[str, Any]], output: Path) -> None:
    """compare.md, compare.json and compare.png, each replaced whole (a kill never leaves half a file)."""
    for name, text in (("compare.md", markdown(rows)), ("compare.json", json.dumps(rows, indent=1))):
        write_text_atomic(output / name, text)
    png = chart(rows, output / ".compare.tmp.png")
    if png is not None:
        png.replace(output / "compare.png")


# -- command line -------------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace, extra: list[str] = ()) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods: give at least one method, e.g. --methods lora,qlora,adapter")
    rows = compare(methods, list(extra), args.output)
    print(markdown(rows), end="")
    output = Path(args.output)
    print(f"written: {output / 'compare.md'}, {output / 'compare.json'}"
          + (f", {output / 'compare.png'}" if (output / "compare.png").exists() else ""))
    return 1 if any("error" in r for r in rows) else 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("compare", help="train several methods the same way on your data; a table and a chart of "
                       "gain vs cost", usage="tuneforge compare --methods lora,qlora,... [--output DIR] "
                       "[any train flag: --data mine.jsonl --eval-data held.jsonl --max-steps 50 ...]",
                       description="Every other flag is passed to each method's `tuneforge train` unchanged. "
                       "Rerun the same command to continue a killed compare: finished methods are skipped.")
    p.add_argument("--methods", required=True, help="comma-separated: lora,qlora,adapter,prompt_tuning,...")
    p.add_argument("--output", default="runs/compare", help="the compare directory (runs/METHOD inside)")
    p.set_defaults(func=cmd_compare, passthrough=True)


__all__ = ["compare", "read_row", "markdown", "chart", "draw_chart", "write_report"]
