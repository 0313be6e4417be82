"""``tuneforge compare``: train several methods the same way on the user's data and set gain against cost.

Each method runs ``tuneforge train`` in its own process (so peak memory is that method's alone, and one method
crashing cannot take the others with it), with the same flags, into ``OUTPUT/runs/METHOD``. After every method
the table is rewritten — ``compare.md``, ``compare.json`` and ``compare.png`` (gain vs trainable parameters,
peak memory and wall time) — so a killed compare loses at most the method it was running; run the same command
again and methods already finished are read back, not retrained (one killed mid-run resumes from its last
checkpoint when ``--save-every`` wrote one). ``OUTPUT/compare_state.json`` records the signature each run was started
with (its settings and a fingerprint of its data files, ``run/reuse.py``): a finished or checkpointed run made with
other settings or data is refused, naming what changed; ``--overwrite`` trains those methods again (every method,
when nothing changed).

A method's own options (``--lora-r 4``, by the method's flag prefix) reach that method only; every other flag reaches
every method. The ``tuneforge train`` children die with compare (even when it is killed with SIGKILL, on Linux).

Gain is the held-out loss the run removed (``eval loss before - after``); exact match (chat data), preference
accuracy (pairs) and forgetting (general-text loss after - before, see ``--general-eval``) sit beside it; with
``--general-eval tasks:NAME[,NAME]``, each benchmark's primary metric before and after and its ``forgetting_<task>``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..run.checkpoint import latest_checkpoint, read_run_record, write_text_atomic
from ..flags import flag_groups, flag_key, flag_value, parse_overrides
from ..outputs import check_output
from ..run.report import plain_log_labels
from ..run.reuse import SettingsChanged, changes, signature

if TYPE_CHECKING:  # config imports torch: loaded by the functions that build configs, not by `--help`
    from ..config import RunConfig

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

STATE_NAME = "compare_state.json"  # per method, the signature its run was started with
# A row is also what its run measured: these evaluation settings, free to change on --resume, shape the row.
ROW_SETTINGS = ("general_eval", "general_eval_limit", "eval_before", "eval_generate", "eval_max_new_tokens",
                "eval_limit")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_subprocess(args: list[str]) -> tuple[int, str]:
    """Run ``python -m tuneforge ARGS``; its exit status and the tail of what it wrote to stderr. The child dies
    with compare: by SIGTERM from the kernel if compare is killed (even by SIGKILL), by ``terminate`` if compare
    stops on an error or Ctrl-C, so no training run goes on alone holding its output folder."""
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_parent_death_signal())
    # The child's log lines (each stage it starts and ends: exact match, perplexity, steps) reach the user as they
    # come, so a method that trains for minutes is never a silent wait; the tail is kept for the error row.
    tail: collections.deque[str] = collections.deque(maxlen=64)
    relay = threading.Thread(target=_relay, args=(proc.stderr, tail), daemon=True)
    relay.start()
    try:
        out = proc.stdout.read()
        proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        relay.join(timeout=5)
    sys.stdout.write(out)
    return proc.returncode, "".join(tail)[-2000:]


def _relay(stream, tail: collections.deque[str]) -> None:
    for line in stream:
        sys.stderr.write(line)
        tail.append(line)


def _parent_death_signal() -> Callable[[], None] | None:
    """For ``preexec_fn``: the child asks Linux for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG); None
    elsewhere. The parent is the thread that started the child: compare runs its methods from one thread."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # compare died before the prctl: no signal would come
            os._exit(1)

    return preexec


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def finished(run_dir: Path) -> bool:
    record = read_run_record(run_dir)
    return bool(record and record.get("finished")) and (run_dir / SUMMARY_NAME).is_file()


def train_args(method: str, run_dir: Path, flags: list[str], resume: bool = False) -> list[str]:
    """The method's ``tuneforge train`` command line: the shared flags, then its method and output, then whether it
    continues its killed run (``resume``) or starts over."""
    return ["train", *flags, "--method", method, "--output", str(run_dir), "--progress", "false",
            "--resume" if resume else "--overwrite"]


def method_flags(names: list[str], flags: list[str]) -> dict[str, list[str]]:
    """Each method's flags: the shared ones and its own options (``--lora-r 4`` reaches lora alone; an option of a
    method not compared is refused). A leading config file stays first."""
    from ..config import RunConfig
    from ..methods.base import METHODS

    shared, tokens = _config_file(flags)
    own: dict[str, list[str]] = {name: [] for name in names}
    for group in flag_groups(tokens):
        key = flag_key(group)
        if key == "method_options":
            raise ValueError("compare: --method-options would reach every method; give each method's options with "
                             "its prefix (--lora-r 4, --prompt-num-virtual-tokens 20)")
        routed = None if key in RunConfig.model_fields else METHODS.route(key)
        if routed is None:
            shared += group
        elif routed[0].name in own:
            own[routed[0].name] += group
        else:
            raise ValueError(f"compare: {group[0]} is an option of {routed[0].name}, which --methods does not "
                             f"name ({', '.join(names)}){_other_spellings(routed[1], names)}")
    return {name: shared + own[name] for name in names}


def _other_spellings(option: str, names: list[str]) -> str:
    """How the compared methods that have ``option`` take it (``--qlora-r`` for LoRA's ``--lora-r``)."""
    from ..methods.base import METHODS
    from ..options import option_names

    prefix = {cls.name: p for p, cls in METHODS.flag_prefixes().items()}
    flags = [f"--{prefix[n]}-{option}".replace("_", "-") for n in names
             if option in option_names(METHODS.get(n).config_class)]
    return f"; for those methods give {', '.join(flags)}" if flags else ""


def _config_file(flags: list[str]) -> tuple[list[str], list[str]]:
    """``([CONFIG.yaml], the flags after it)``: ``tuneforge train`` takes a config file as its first argument."""
    return ([flags[0]], flags[1:]) if flags and not flags[0].startswith("-") else ([], flags)


def run_config(args: list[str]) -> RunConfig:
    """The config ``tuneforge train ARGS`` runs with (no config file and no data: the bundled demo's)."""
    from ..config import load_config

    head, tokens = _config_file(args[1:])
    path = head[0] if head else None
    overrides = parse_overrides(tokens)
    overrides.pop("nproc_per_node", None)  # a launcher flag, not a config key
    if path is None and overrides.get("data") is None:
        from ..run.trainer import DEMO_DIR

        path = str(DEMO_DIR / "demo.yaml")
    return load_config(path, overrides)


def _own_flags(flags: list[str]) -> tuple[list[str], bool]:
    """``flags`` without --resume / --overwrite (compare decides per method), and whether --overwrite was given."""
    kept, tokens = _config_file(flags)
    overwrite = False
    for group in flag_groups(tokens):
        if flag_key(group) in ("resume", "overwrite"):
            overwrite = overwrite or (flag_key(group) == "overwrite" and flag_value(group) is True)
        else:
            kept += group
    return kept, overwrite


def compare(methods: list[str], flags: list[str], output: str | Path, runner: Runner = run_subprocess,
            overwrite: bool = False) -> list[dict[str, Any]]:
    """Train each method (reusing a finished run made with the same settings and data), rewriting the report after
    each; the rows, in order. A finished or checkpointed run made otherwise is refused, naming what changed, unless
    ``overwrite``: then the changed methods train again, or every method when none changed (the user asked)."""
    from ..methods.base import METHODS

    names = [METHODS.get(m).name for m in methods]  # an unknown method fails before anything runs
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {', '.join(methods)}")
    flags, asked = _own_flags(list(flags))
    overwrite = overwrite or asked
    output = Path(output)
    own = method_flags(names, flags)
    # Every method's config is built (and checked) before any trains.
    configs = {name: run_config(train_args(name, output / "runs" / name, own[name])) for name in names}
    state = read_state(output)
    ours = state is not None or (output / "compare.json").is_file()  # a compare's folder (perhaps an older one's)
    check_output(output, inputs=_inputs(configs.values()), overwrite=overwrite or ours)
    state = state or {"runs": {}}
    plan = plan_runs(configs, state, overwrite)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names, start=1):
        run_dir = output / "runs" / name
        if plan[name] == "reuse":
            log.info("compare: %s already finished in %s with the same settings and data; reading it back", name,
                     run_dir)
        else:
            state["runs"][name] = signature(configs[name], keep=ROW_SETTINGS)
            write_text_atomic(output / STATE_NAME, json.dumps(state, indent=1))
            log.info("compare: [%d/%d] training %s -> %s", i, len(names), name, run_dir)
            start = time.perf_counter()
            code, err = runner(train_args(name, run_dir, own[name], resume=plan[name] == "resume"))
            if code != 0:
                rows.append({"method": name, "error": _last_error_line(err)})
                write_report(rows, output)
                continue
            (run_dir / WALL_NAME).write_text(json.dumps({"wall_s": round(time.perf_counter() - start, 2)}))
        rows.append(read_row(name, run_dir))
        write_report(rows, output)
    return rows


def read_state(output: Path) -> dict[str, Any] | None:
    path = output / STATE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _inputs(configs) -> list[str]:
    """What the runs read: the model and the data files (an output there would replace them)."""
    from ..data.mixing import parse_sources

    found: list[str] = []
    for config in configs:
        found += [config.model, config.eval_data, *(s.file for s in parse_sources(config.data))]
    return [p for p in found if p]


def plan_runs(configs: dict[str, RunConfig], state: dict[str, Any], overwrite: bool) -> dict[str, str]:
    """Per method: "reuse" its finished run, "resume" its checkpointed one, or "train" from the start. Work made
    with other settings or data is refused before anything trains, naming what changed for each method; with
    ``overwrite`` those methods train again, and every method when none changed."""
    plan, changed = {}, {}
    for name, config in configs.items():
        run_dir = Path(config.output)
        done = finished(run_dir)
        if not (done or latest_checkpoint(run_dir) is not None):
            plan[name] = "train"  # nothing to lose
            continue
        diff = changes(state["runs"].get(name), signature(config, keep=ROW_SETTINGS))
        if diff:
            changed[name] = ", ".join(diff)
        plan[name] = "train" if diff else "reuse" if done else "resume"
    if changed and not overwrite:
        # Settings are shared, so methods usually differ the same way: one phrase for each group of them.
        groups: dict[str, list[str]] = {}
        for name, why in changed.items():
            groups.setdefault(why, []).append(name)
        raise SettingsChanged("compare: " + "; ".join(f"{', '.join(n)}: {why}" for why, n in groups.items())
                              + "; pass --overwrite to train them again")
    return {name: "train" for name in plan} if overwrite and not changed else plan


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
    if m.get("benchmarks"):  # --general-eval tasks:...: each task's primary metric before / after, and forgetting
        row["benchmarks"] = m["benchmarks"]
        row.update({keys[k]: m[keys[k]] for keys in m["benchmarks"].values() for k in ("before", "after", "forgetting")
                    if isinstance(m.get(keys[k]), (int, float))})
    return row


def benchmark_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(column, title, format) for the benchmarks any row measured, in the order they were asked for."""
    columns: dict[str, tuple[str, str, str]] = {}
    for row in rows:
        for task, keys in row.get("benchmarks", {}).items():
            name = f"{task} {keys['metric']}"
            columns.setdefault(keys["before"], (keys["before"], f"{name} before", "{:.4f}"))
            columns.setdefault(keys["after"], (keys["after"], f"{name} after", "{:.4f}"))
            columns.setdefault(keys["forgetting"], (keys["forgetting"], f"{task} forgetting", "{:+.4f}"))
    return list(columns.values())


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in COLUMNS[:-1] + benchmark_columns(rows) + COLUMNS[-1:] if any(c[0] in r for r in rows)]
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
    rows = compare(methods, list(extra), args.output, overwrite=args.overwrite)
    print(markdown(rows), end="")
    output = Path(args.output)
    print(f"written: {output / 'compare.md'}, {output / 'compare.json'}"
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
    p.add_argument("--output", default="runs/compare", help="the compare directory (runs/METHOD inside)")
    p.add_argument("--overwrite", action="store_true", help="train again the methods whose settings or data "
                   "changed (refused without it), every method when none did; also: use an output folder that holds "
                   "something else")
    p.set_defaults(func=cmd_compare, passthrough=True)


__all__ = ["compare", "read_row", "markdown", "chart", "draw_chart", "write_report"]
