"""The run report: PNG charts of a run's metrics.jsonl and one self-contained HTML page that overlays several runs.

Every metric the runs logged gets a chart: loss first (train solid, eval dashed, eval at step 0 being the model
before training), then learning rate, gradient norm, tokens/s, then the objective's own (reward margins, KL,
accuracy ...), each train metric overlaid with its ``eval_`` twin; a series of two points (an evaluation before and
one after training) is two marks, not a line that would invent a path between them. Values a run logs once go to a
table of final values instead: before → after (exact match as percentages), then what the run's ``summary.json``
knows at its end (forgetting, wall time, peak memory). The page embeds the PNGs as base64, so it is one file to mail
or archive, and lists the config keys whose values differ between the runs (each run's ``tuneforge.yaml``).

``tuneforge report RUN [RUN ...]`` writes ``index.html``, one PNG per chart and ``overview.png`` (every chart in
one image) into ``--output`` (default ``RUN/report`` for one run, ``report`` for several).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..outputs import check_not_input, check_output, staged_dir
from .tracking import flatten

# Charted first, in this order; every other metric follows alphabetically.
LEADING = ("loss", "lr", "grad_norm", "tokens_per_s")
TITLES = {"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
          "tokens_per_s": "tokens / s (cumulative average)", "peak_memory_mb": "peak memory, MB"}
# Bookkeeping, not a signal: the step is the x axis, epoch is a rescaled step, units/tokens are batch sizes.
NOT_CHARTED = {"step", "epoch", "units", "tokens"}
SUMMARY_FILE = "summary.json"  # the trainer's final metrics (trainer.write_summary)
# Fractions a reader thinks of as percentages.
PERCENT_STEMS = ("exact_match", "accuracy")
# Before → after rows, by stem: their names on the page; a stem not here is named by itself.
PAIR_LABELS = {"eval_loss": "held-out loss", "exact_match": "held-out exact match",
               "general_ppl": "general-text perplexity"}
# general_loss is the log of general_ppl, and forgetting below is its change: a third row would say it again.
PAIRS_NOT_SHOWN = {"general_loss"}
# Known once, at the end of a run (summary.json), in this order. peak_memory_mb (CUDA allocated on a GPU, the
# process max RSS otherwise) is shown only for runs from before peak_rss_mb existed.
SUMMARY_ROWS = (("forgetting", "forgetting: general-text loss after − before (> 0: forgot)"),
                ("trainable_params", "trainable parameters"),
                ("train_wall_s", "wall time, s (load, evaluate, train, save)"),
                ("peak_rss_mb", "peak memory, MB: process max RSS"),
                ("peak_cuda_allocated_mb", "peak memory, MB: CUDA max allocated"),
                ("peak_cuda_reserved_mb", "peak memory, MB: CUDA max reserved"),
                ("peak_memory_mb", "peak memory, MB"))


@dataclass
class Run:
    """One run directory as the report sees it: its log, its config and the name it goes by on the page."""

    path: Path
    label: str
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json: {} for a run killed before its end

    def series(self, key: str) -> tuple[list[float], list[float]]:
        points = [(r.get("step", 0), r[key]) for r in self.records if _is_number(r.get(key))]
        return [p[0] for p in points], [p[1] for p in points]

    def last(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else None

    def final(self, key: str) -> float | None:
        """The run's own final number for ``key``: summary.json's, else the last logged."""
        value = self.summary.get(key)
        return value if _is_number(value) else self.last(key)

    def before_after(self) -> dict[str, tuple[float | None, float | None]]:
        """Numbers measured before and after training, by stem: ``eval_X`` at step 0 and at its last (later) step,
        ``X_before`` / ``X_after`` (exact match, general-text perplexity) as logged or summarised."""
        pairs: dict[str, list[float | None]] = {}
        for key in {k for r in self.records for k in r} | set(self.summary):
            if key.startswith("eval_before_"):  # summary.json's copy of the step-0 evaluation
                pairs.setdefault("eval_" + key.removeprefix("eval_before_"), [None, None])
            elif key.startswith("eval_") and _is_metric(key):
                pairs.setdefault(key, [None, None])
            elif key.endswith(("_before", "_after")) and self.final(key) is not None:
                stem, _, side = key.rpartition("_")
                pairs.setdefault(stem, [None, None])[side == "after"] = self.final(key)
        for key in [k for k in pairs if k.startswith("eval_")]:
            steps, values = self.series(key)
            before = values[0] if steps and steps[0] == 0 else self.summary.get(key.replace("eval_", "eval_before_", 1))
            after = values[-1] if steps and steps[-1] > 0 else self.summary.get(key)
            pairs[key] = [before if _is_number(before) else None, after if _is_number(after) else None]
        return {stem: (b, a) for stem, (b, a) in pairs.items() if b is not None or a is not None}


@dataclass
class Chart:
    key: str  # the train-side name ("loss"); its eval twin is "eval_" + key
    title: str
    png: bytes


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_metric(key: str) -> bool:
    return key not in NOT_CHARTED and not key.endswith("_seconds")  # how long an evaluation took is not a result


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read ``RUN/metrics.jsonl`` (a line a killed run cut short is skipped) and ``RUN/tuneforge.yaml``."""
    path = Path(path)
    log = path / "metrics.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is it a tuneforge run directory?)")
    records = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a run killed mid-write
        if not isinstance(record, dict):
            raise ValueError(f"{log}:{number}: expected a JSON object per line")
        records.append(record)
    config_file = path / "tuneforge.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    summary_file = path / SUMMARY_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return Run(path, label or path.resolve().name, records, config, summary if isinstance(summary, dict) else {})


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Runs labelled by directory name, or by the path as given where two names collide (``a/run``, ``b/run``)."""
    if not paths:
        raise ValueError("report: give at least one run directory")
    names = [Path(p).resolve().name for p in paths]
    return [load_run(p, name if names.count(name) == 1 else str(p)) for p, name in zip(paths, names)]


def chart_keys(runs: list[Run]) -> list[str]:
    """Train-side metric names to chart: logged at two or more steps by some run (or only as ``eval_X``)."""
    counts: dict[str, int] = {}
    for run in runs:
        for record in run.records:
            for key, value in record.items():
                if _is_number(value) and _is_metric(key):
                    base = key.removeprefix("eval_")
                    counts[base] = max(counts.get(base, 0), len(run.series(key)[0]))
    charted = {k for k, n in counts.items() if n >= 2}
    return [k for k in LEADING if k in charted] + sorted(charted - set(LEADING))


def single_values(runs: list[Run]) -> list[str]:
    """Metrics no run logged more than once (exact match before / after): the final-values table shows them."""
    charted = set(chart_keys(runs))
    keys = {k for run in runs for r in run.records for k, v in r.items() if _is_number(v)}
    return sorted(k for k in keys if k.removeprefix("eval_") not in charted and _is_metric(k))


def _log_scale(values: list[float]) -> bool:
    # A loss falling from 2 to 0.01 is a flat line at the bottom of a linear axis after the first steps.
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 2 and max(positive) / min(positive) > 30


def plot_metric(axes, runs: list[Run], key: str) -> str:
    """Draw ``key`` and its ``eval_`` twin for every run (one colour per run) on ``axes``; returns the title."""
    plotted: list[float] = []
    for index, run in enumerate(runs):
        for name, style in ((key, dict(linestyle="-", linewidth=1.6)),
                            (f"eval_{key}", dict(linestyle="--", marker="o", markersize=4, linewidth=1.2))):
            steps, values = run.series(name)
            if not steps:
                continue
            if len(steps) <= 2:  # before and after: nothing was measured in between, so no line claims a path
                style = dict(linestyle="none", marker="o" if name == key else "D", markersize=7)
            side = "eval" if name.startswith("eval_") else "train"
            axes.plot(steps, values, color=f"C{index % 10}", label=side if len(runs) == 1 else f"{run.label} ({side})",
                      **style)
            plotted += values
    title = TITLES.get(key, key.replace("_", " "))
    if _log_scale(plotted):
        axes.set_yscale("log")
        plain_log_labels(axes.yaxis, plotted)
        title += " (log scale)"
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return title


def plain_log_labels(axis, values: list[float], label: Callable[[float], str] = "{:g}".format) -> None:
    """Numbers ("60", "0.02", or ``label``'s "2k") on a log axis, not matplotlib's "6×10¹": the 1-2-5 ticks of a short
    axis are labelled, the in-between ticks of one spanning three decades or more are not (they would crowd)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: label(value)))
    if math.log10(max(values) / min(values)) >= 3:
        axis.set_minor_formatter(NullFormatter())
        return

    def one_two_five(value: float, _) -> str:
        leading = round(value / 10 ** math.floor(math.log10(value)))
        return label(value) if leading in (2, 5) else ""

    axis.set_minor_formatter(FuncFormatter(one_two_five))


def draw_chart(runs: list[Run], key: str) -> Chart:
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend

    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    title = plot_metric(figure.subplots(), runs, key)
    return Chart(key, title, _png(figure))


def draw_overview(runs: list[Run], keys: list[str]) -> bytes:
    """Every chart in one image (two columns): the picture for a README or a chat message."""
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(len(keys) / 2))
    figure = Figure(figsize=(12, 3.4 * rows), layout="constrained")
    grid = figure.subplots(rows, 2, squeeze=False)
    for index, axes in enumerate(grid.flat):
        if index < len(keys):
            plot_metric(axes, runs, keys[index])
        else:
            axes.set_visible(False)
    figure.suptitle(", ".join(run.label for run in runs))
    return _png(figure)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def config_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """Config keys (dotted: ``method_options.r``) whose value is not the same in every run; one run: all keys."""
    flat = [flatten(run.config) for run in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = object()
    rows = {k: [f.get(k, missing) for f in flat] for k in keys}
    if len(runs) > 1:
        rows = {k: v for k, v in rows.items() if any(x != v[0] for x in v)}
    return {k: ["—" if x is missing else x for x in v] for k, v in rows.items()}


def render_html(runs: list[Run], charts: list[Chart], finals: list[str]) -> str:
    e = html.escape
    title = "tuneforge report: " + ", ".join(run.label for run in runs)
    head = "".join(f"<th>{e(run.label)}</th>" for run in runs)
    summary = "".join(_row(label, cells) for label, cells in final_rows(runs, finals))
    differences = config_differences(runs)
    config_rows = "".join(_row(key, values) for key, values in differences.items())
    if not config_rows:
        config_rows = f"<tr><td colspan={len(runs) + 1}>the runs' configs are identical</td></tr>"
    images = "".join(
        f'<figure><img alt="{e(chart.title)}" src="data:image/png;base64,{base64.b64encode(chart.png).decode()}">'
        "</figure>" for chart in charts)
    paths = " ".join(f"<code>{e(str(run.path))}</code>" for run in runs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
thead th {{ background: #f3f3f3; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }}
img {{ width: 640px; max-width: 100%; height: auto; }}
</style></head>
<body>
<h1>{e(title)}</h1>
<p>{paths}</p>
<h2>Final values</h2>
<table><thead><tr><th></th>{head}</tr></thead><tbody>{summary}</tbody></table>
<h2>Charts</h2>
<div class="charts">{images or "<p>no metric was logged at more than one step</p>"}</div>
<h2>{"Config" if len(runs) == 1 else "Config differences"}</h2>
<table><thead><tr><th>key</th>{head}</tr></thead><tbody>{config_rows}</tbody></table>
</body></html>
"""


def final_rows(runs: list[Run], finals: list[str]) -> list[tuple[str, list[str]]]:
    """The final-values table, one (label, cell per run) a row: steps and the last train loss; every number measured
    before and after training as "before → after"; the rest of ``finals`` (metrics logged once); then SUMMARY_ROWS."""
    rows = [("steps", [_steps(run) for run in runs])]
    if any(run.last("loss") is not None for run in runs):
        rows.append(("train loss (last logged)", [_fmt(run.last("loss")) for run in runs]))
    pairs = [run.before_after() for run in runs]
    stems = sorted({stem for p in pairs for stem in p} - PAIRS_NOT_SHOWN, key=lambda s: (s != "eval_loss", s))
    for stem in stems:
        label = PAIR_LABELS.get(stem, stem.removeprefix("eval_").replace("_", " "))
        rows.append((f"{label}, before → after", [_before_after(stem, p.get(stem)) for p in pairs]))
    paired = {f"{stem}_{side}" for stem in {*stems, *PAIRS_NOT_SHOWN} for side in ("before", "after")}
    rows += [(key, [_fmt(run.final(key)) for run in runs]) for key in finals if key not in paired]
    has_rss = any("peak_rss_mb" in run.summary for run in runs)
    for key, label in SUMMARY_ROWS:
        if any(_is_number(run.summary.get(key)) for run in runs) and not (key == "peak_memory_mb" and has_rss):
            rows.append((label, [_fmt_summary(key, run.summary.get(key)) for run in runs]))
    return rows


def _before_after(stem: str, pair: tuple[float | None, float | None] | None) -> str:
    if pair is None:
        return "—"
    percent = any(name in stem for name in PERCENT_STEMS)
    return " → ".join(f"{v:.1%}" if percent and v is not None else _fmt(v) for v in pair)


def _fmt_summary(key: str, value: Any) -> str:
    if not _is_number(value):
        return "—"
    if key.endswith("_mb") or key == "trainable_params":
        return f"{value:,.0f}"
    return f"{value:+.4f}" if key == "forgetting" else _fmt(value)


def _row(key: str, values: list[Any]) -> str:
    return f"<tr><th>{html.escape(key)}</th>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in values) + "</tr>"


def _steps(run: Run) -> str:
    steps = [r.get("step", 0) for r in run.records]
    return str(max(steps)) if steps else "—"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"  # as the YAML config writes it
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def chart_file_name(key: str) -> str:
    """A metric's PNG name: GRPO's ``clip_ratio/low`` and per-source ``rewards/0`` would otherwise name a
    subdirectory that does not exist."""
    return re.sub(r"[^\w.-]", "_", key) + ".png"


def write_report(paths: list[str | Path], output: str | Path | None = None, overwrite: bool = False) -> Path:
    """Charts and the HTML page for ``paths`` (run directories) in ``output``; returns the page's path.

    ``output`` is never one of the runs nor a folder holding one; an earlier report there is replaced whole, any
    other non-empty folder only with ``overwrite`` (``outputs.check_output``)."""
    runs = load_runs(list(paths))
    output = Path(output) if output is not None else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    check_not_input(output, [run.path for run in runs], allow_inside=True)
    check_output(output, overwrite=overwrite or is_report(output))
    keys = chart_keys(runs)
    charts = [draw_chart(runs, key) for key in keys]
    with staged_dir(output) as staging:  # the old report's charts must not outlive it (a metric no longer logged)
        for chart in charts:
            (staging / chart_file_name(chart.key)).write_bytes(chart.png)
        if keys:
            (staging / "overview.png").write_bytes(draw_overview(runs, keys))
        (staging / REPORT_PAGE).write_text(render_html(runs, charts, single_values(runs)))
    return output / REPORT_PAGE


REPORT_PAGE = "index.html"


def is_report(folder: Path) -> bool:
    """A folder tuneforge's report wrote: its page and PNG charts, nothing else."""
    if not (folder / REPORT_PAGE).is_file():
        return False
    return all(entry.is_file() and (entry.name == REPORT_PAGE or entry.suffix == ".png") for entry in folder.iterdir())


def add_subcommands(sub) -> None:
    """``tuneforge report RUN [RUN ...]`` (the CLI collects this through its extensions)."""
    report = sub.add_parser("report", help="charts of one or more runs' metrics and an HTML page comparing them")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with metrics.jsonl)")
    report.add_argument("--output", help="where to write index.html and the PNGs (default: RUN/report for one run, "
                        "report for several)")
    report.add_argument("--overwrite", action="store_true", help="replace a non-empty --output that is not a report")
    report.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    print(write_report(args.runs, args.output, overwrite=args.overwrite))
    return 0
