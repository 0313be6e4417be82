"""``tuneforge compare``: train several methods the same way on the user's data, several seeds each, and set gain
against cost and forgetting, with intervals and a verdict.

Each method trains with ``--seeds K`` seeds (the run's ``--seed`` and the next K - 1; default 3), each run a
``tuneforge train`` in its own process (so peak memory is that run's alone, and one run crashing cannot take the
others with it), with the same flags, into ``OUTPUT/runs/METHOD/seed-N``. Each method keeps its own defaults unless
the user sets one: a ``--learning-rate`` flag reaches every method, a config file's learning rate its own method
(the demo's 1e-3 is LoRA's), and every other method trains with its own default learning rate; the table shows what
each used. While a run trains, its progress (step, loss, time left) is logged from its metrics.jsonl.

After every run the report is rewritten — ``compare.md`` (per method: mean and bootstrap 95% interval of gain,
forgetting, wall time, peak memory and tokens seen, the verdict in words, then every run), ``compare.json`` (every
run's row), ``compare_summary.json`` and ``compare.png`` (``choose/chart.py``) — so a killed compare loses at most the
run it was running; run the same command again and runs already finished are read back, not retrained (one killed
mid-run resumes from its last checkpoint when ``--save-every`` wrote one). ``OUTPUT/compare_state.json`` records the
signature each run was started with (its settings and a fingerprint of its data files, ``run/reuse.py``): a
finished or checkpointed run made with other settings or data is refused, naming what changed; ``--overwrite``
trains those runs again (every run, when nothing changed). ``--budget-tokens N`` gives every method the same number
of training tokens (``choose/budget.py``).

A method's own options (``--lora-r 4``, by the method's flag prefix) reach that method only; every other flag reaches
every method. The ``tuneforge train`` children die with compare (even when it is killed with SIGKILL, on Linux).

Gain is the held-out loss the run removed (``eval loss before - after``); exact match (chat data), preference
accuracy (pairs) and forgetting (general-text loss after - before, see ``--general-eval``) sit beside it; with
``--general-eval tasks:NAME[,NAME]``, each benchmark's primary metric before and after and its ``forgetting_<task>``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import yaml

from ..run.checkpoint import latest_checkpoint, read_run_record, write_text_atomic
from ..flags import flag_groups, flag_key, flag_value, parse_overrides
from ..outputs import check_output
from .chart import chart
from .measured import training_pace
from .summary import FORMATS, QUANTITIES, cell, summarize, verdict
from .watch import Watcher
from ..run.reuse import SettingsChanged, changes, signature

if TYPE_CHECKING:  # config imports torch: loaded by the functions that build configs, not by `--help`
    from ..config import RunConfig

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"  # written by trainer.train() into every finished run
WALL_NAME = "compare_wall.json"  # the wall time compare measured for a method, kept beside its run

# (column, title, format) for the table; a column no method has is left out.
COLUMNS = [("method", "method", "{}"), ("seed", "seed", "{}"), ("learning_rate", "learning rate", "{:g}"),
           ("trainable_params", "trainable params", "{:,}"),
           ("trainable_percent", "% trainable", "{:.3f}"), ("peak_memory_mb", "peak MB", "{:,.0f}"),
           ("wall_s", "wall s", "{:.1f}"), ("step_s", "s/step", "{:.3g}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
           ("tokens_seen", "tokens seen", "{:,}"),
           ("eval_before_loss", "eval loss before", "{:.4f}"), ("eval_loss", "eval loss after", "{:.4f}"),
           ("gain", "gain (loss drop)", "{:+.4f}"), ("eval_before_accuracy", "pair acc. before", "{:.1%}"),
           ("eval_accuracy", "pair acc. after", "{:.1%}"), ("exact_match_before", "exact match before", "{:.1%}"),
           ("exact_match_after", "exact match after", "{:.1%}"), ("general_ppl_before", "general ppl before",
                                                                  "{:.3f}"),
           ("general_ppl_after", "general ppl after", "{:.3f}"), ("forgetting", "forgetting", "{:+.4f}"),
           ("error", "error", "{}")]

Runner = Callable[[list[str]], tuple[int, str]]

SUMMARY_FILE = "compare_summary.json"  # per method over its seeds: values, intervals; the verdict
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
    assert proc.stdout is not None and proc.stderr is not None  # both piped above
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
        from ..run.training_data import DEMO_DIR

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
            overwrite: bool = False, seeds: int = 3, budget_tokens: int | None = None) -> list[dict[str, Any]]:
    """Train each method with ``seeds`` seeds (the run's ``--seed`` and the next ones), reusing a finished run made
    with the same settings and data, rewriting the report after each; the per-run rows, in order. A finished or
    checkpointed run made otherwise is refused, naming what changed, unless ``overwrite``: then the changed runs
    train again, or every run when none changed (the user asked). ``budget_tokens``: every method of a seed trains
    the steps that hold that many training tokens (``choose/budget.py``)."""
    flags, asked = _own_flags(list(flags))
    overwrite = overwrite or asked
    output = Path(output)
    plan = plan_compare(methods, flags, output, seeds, budget_tokens)
    state = read_state(output)
    ours = state is not None or (output / "compare.json").is_file()  # a compare's folder (perhaps an older one's)
    check_output(output, inputs=_inputs(plan.configs.values()), overwrite=overwrite or ours)
    state = state or {"runs": {}}
    todo = plan_runs({run_key(*run): c for run, c in plan.configs.items()}, state, overwrite)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, run in enumerate(plan.configs, start=1):
        label = f"compare: [{i}/{len(plan.configs)}] {run[0]}, seed {run[1]}"
        rows.append(_train_or_read(plan, run, todo[run_key(*run)], state, output, runner, label))
        write_report(rows, output, plan.seeds[0])
    return rows


@dataclasses.dataclass
class ComparePlan:
    """Every run of a compare, built and checked before any trains: per (method, seed) its flags and config, in
    training order (seed-major: a first full row of methods early); per method its learning rate's source."""

    seeds: list[int]
    rates: dict[str, tuple[str, list[str]]]
    flags: dict[tuple[str, int], list[str]]
    configs: dict[tuple[str, int], RunConfig]


def plan_compare(methods: list[str], flags: list[str], output: Path, seeds: int,
                 budget_tokens: int | None) -> ComparePlan:
    from ..methods.base import METHODS

    names = [METHODS.get(m).name for m in methods]  # an unknown method fails before anything runs
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {', '.join(methods)}")
    if type(seeds) is not int or seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {seeds!r}")
    own = method_flags(names, flags)
    rates = learning_rates(names, flags, own)
    first = run_config(train_args(names[0], output / "runs", own[names[0]]))
    seed_list = [first.seed + i for i in range(seeds)]
    budget = budget_steps(first, seed_list, budget_tokens, flags)
    run_flags = {(name, seed): [*own[name], *rates[name][1], "--seed", str(seed), *budget.get(seed, [])]
                 for seed in seed_list for name in names}
    with _said_once(logging.getLogger("tuneforge.config")):  # K seeds' configs say the same things: once
        configs = {run: run_config(train_args(run[0], run_folder(output, *run), f)) for run, f in run_flags.items()}
    _log_learning_rates(rates)
    return ComparePlan(seed_list, rates, run_flags, configs)


def _train_or_read(plan: ComparePlan, run: tuple[str, int], todo: str, state: dict[str, Any], output: Path,
                   runner: Runner, label: str) -> dict[str, Any]:
    """One run's row: read back (``todo`` "reuse"), or trained ("train", "resume") with its progress logged."""
    (name, seed), run_dir, config = run, run_folder(output, *run), plan.configs[run]
    if todo == "reuse":
        log.info("%s: already finished in %s with the same settings and data; reading it back", label, run_dir)
    else:
        state["runs"][run_key(*run)] = signature(config, keep=ROW_SETTINGS)
        write_text_atomic(output / STATE_NAME, json.dumps(state, indent=1))
        log.info("%s: training -> %s", label, run_dir)
        start = time.perf_counter()
        with Watcher(run_dir / "metrics.jsonl", label, config.max_steps):
            code, err = runner(train_args(name, run_dir, plan.flags[run], resume=todo == "resume"))
        if code != 0:
            return {"method": name, "seed": seed, "error": _last_error_line(err)}
        (run_dir / WALL_NAME).write_text(json.dumps({"wall_s": round(time.perf_counter() - start, 2)}))
    return {**read_row(name, run_dir), "seed": seed, "learning_rate": effective_learning_rate(config),
            "learning_rate_source": plan.rates[name][0]}


def effective_learning_rate(config: RunConfig) -> float:
    return config.learning_rate if config.learning_rate is not None else config.method_class.default_learning_rate


@contextlib.contextmanager
def _said_once(logger: logging.Logger) -> Iterator[None]:
    """Within the block, each message of ``logger`` is logged once (the K seeds' configs say the same things)."""
    seen: set[str] = set()

    def first_time(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        fresh = text not in seen
        seen.add(text)
        return fresh

    logger.addFilter(first_time)
    try:
        yield
    finally:
        logger.removeFilter(first_time)


def run_key(method: str, seed: int) -> str:
    return f"{method}/seed-{seed}"


def run_folder(output: Path, method: str, seed: int) -> Path:
    return output / "runs" / method / f"seed-{seed}"


def learning_rates(names: list[str], flags: list[str], own: dict[str, list[str]]) -> dict[str, tuple[str, list[str]]]:
    """Per method, where its learning rate comes from (in words) and the flags that give it. A --learning-rate flag
    is the user's: every method. A config file's was chosen for the file's method (the demo's 1e-3 for LoRA): that
    method only, or every method when the file names none. Every other method trains with its own default, as
    `tuneforge train` would (`tuneforge methods` lists them), given explicitly so that the file's cannot reach it."""
    from ..methods.base import METHODS

    head, tokens = _config_file(flags)
    if any(flag_key(g) == "learning_rate" for g in flag_groups(tokens)):
        return {name: ("--learning-rate", []) for name in names}
    path = Path(head[0]) if head else None
    if path is None and "data" not in parse_overrides(tokens):
        from ..run.trainer import DEMO_DIR  # no config and no data: train runs the bundled demo's config

        path = DEMO_DIR / "demo.yaml"
    values = yaml.safe_load(path.read_text()) if path is not None and path.is_file() else None
    values = values if isinstance(values, dict) else {}
    out: dict[str, tuple[str, list[str]]] = {}
    for name in names:
        if path is None or values.get("learning_rate") is None:
            out[name] = ("its own default", [])  # train falls back to it
        elif values.get("method") in (None, name):
            out[name] = (f"{path.name}'s", [])
        else:
            out[name] = ("its own default", ["--learning-rate", repr(METHODS.get(name).default_learning_rate)])
    return out


def _log_learning_rates(rates: dict[str, tuple[str, list[str]]]) -> None:
    words = [f"{name}: {source}" for name, (source, _) in rates.items()]
    log.info("compare: learning rates (the table shows each): %s", "; ".join(words))


def budget_steps(config: RunConfig, seeds: list[int], budget_tokens: int | None,
                 flags: list[str]) -> dict[int, list[str]]:
    """``--budget-tokens``: per seed, the --max-steps that hold that many training tokens (the same for every
    method of the seed); empty without a budget."""
    if budget_tokens is None:
        return {}
    if type(budget_tokens) is not int or budget_tokens < 1:
        raise ValueError(f"--budget-tokens must be a positive integer, got {budget_tokens!r}")
    _, tokens = _config_file(flags)
    if any(flag_key(g) in ("max_steps", "epochs") for g in flag_groups(tokens)):
        raise ValueError("compare: --budget-tokens sets each run's steps; drop --max-steps / --epochs")
    from .budget import steps_for_tokens

    out = {}
    for seed in seeds:
        steps, seen = steps_for_tokens(config.model_copy(update={"seed": seed}), budget_tokens)
        log.info("compare: seed %d: %d steps hold %s training tokens (budget %s)", seed, steps, f"{seen:,}",
                 f"{budget_tokens:,}")
        out[seed] = ["--max-steps", str(steps)]
    return out


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
        for key, why in changed.items():  # "lora/seed-0": the method is named once, whichever seeds changed
            names = groups.setdefault(why, [])
            names += [key.split("/")[0]] if key.split("/")[0] not in names else []
        raise SettingsChanged("compare: " + "; ".join(f"{', '.join(n)}: {why}" for why, n in groups.items())
                              + "; pass --overwrite to train them again")
    return {name: "train" for name in plan} if overwrite and not changed else plan


def _last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed (no message)"


def read_row(method: str, run_dir: Path) -> dict[str, Any]:
    """One table row from a finished run's summary.json, its config (seed, learning rate), its metrics.jsonl
    (training tokens seen, seconds per step) and the wall time compare measured."""
    m = json.loads((run_dir / SUMMARY_NAME).read_text())
    row: dict[str, Any] = {"method": method, "run": str(run_dir)}
    row.update(run_settings(method, run_dir))
    for key, *_ in COLUMNS[1:]:
        if key in m and isinstance(m[key], (int, float)):
            row[key] = m[key]
    if m.get("total_params"):
        row["trainable_percent"] = 100 * m["trainable_params"] / m["total_params"]
    wall = run_dir / WALL_NAME
    if wall.is_file():
        row["wall_s"] = json.loads(wall.read_text())["wall_s"]
    row.update(training_pace(run_dir / "metrics.jsonl"))
    if "eval_before_loss" in row and "eval_loss" in row:
        row["gain"] = row["eval_before_loss"] - row["eval_loss"]
    if m.get("benchmarks"):  # --general-eval tasks:...: each task's primary metric before / after, and forgetting
        row["benchmarks"] = m["benchmarks"]
        row.update({keys[k]: m[keys[k]] for keys in m["benchmarks"].values() for k in ("before", "after", "forgetting")
                    if isinstance(m.get(keys[k]), (int, float))})
    return row


def run_settings(method: str, run_dir: Path) -> dict[str, Any]:
    """The seed and the learning rate the run trained with (its own default where its config sets none)."""
    from ..methods.base import METHODS

    path = run_dir / "tuneforge.yaml"
    saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(saved, dict):
        return {}
    lr = saved.get("learning_rate") or METHODS.get(saved.get("method") or method).default_learning_rate
    return {"seed": saved.get("seed", 0), "learning_rate": lr}


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
    """The per-run table: one row per method and seed."""
    columns = [c for c in COLUMNS[:-1] + benchmark_columns(rows) + COLUMNS[-1:] if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summaries, seed: int) -> str:
    """Per method: its learning rate, the seeds that finished, and each quantity's mean [95% interval]; then the
    verdict in words."""
    keys = [(key, words) for key, words, *_ in QUANTITIES if any(key in s.intervals for s in summaries)]
    counted = any(s.trainable_params is not None for s in summaries)
    titles = ["method", "learning rate", "seeds", *(words for _, words in keys)] + ["trainable params"] * counted
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
    for s in summaries:
        seeds = ", ".join(map(str, s.seeds)) + (f" ({len(s.errors)} failed)" if s.errors else "")
        lr = f"{s.learning_rate:g}" if s.learning_rate else ""
        cells = [s.method, f"{lr} ({s.learning_rate_source})" if lr and s.learning_rate_source else lr, seeds,
                 *(cell(s.intervals[k], FORMATS[k]) if k in s.intervals else "" for k, _ in keys)]
        cells += [f"{s.trainable_params:,}" if s.trainable_params is not None else ""] * counted
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n".join(lines) + "\n\nMean [95% bootstrap interval] over the seeds that finished.\n\n"
            f"**Verdict:** {verdict(summaries, seed)}\n")


def report_text(rows: list[dict[str, Any]], seed: int) -> str:
    """compare.md: the summary over seeds and the verdict, then every run."""
    return (summary_markdown(summarize(rows, seed), seed) + "\n## Every run\n\n" + markdown(rows))


def write_report(rows: list[dict[str, Any]], output: Path, seed: int = 0) -> None:
    """compare.md, compare.json (every run's row), compare_summary.json (per method: values, intervals; the
    verdict) and compare.png, each replaced whole (a kill never leaves half a file). ``seed`` seeds the bootstrap."""
    summaries = summarize(rows, seed)
    summary = {"bootstrap_seed": seed, "methods": [s.as_dict() for s in summaries],
               "verdict": verdict(summaries, seed)}
    for name, text in (("compare.md", report_text(rows, seed)), ("compare.json", json.dumps(rows, indent=1)),
                       (SUMMARY_FILE, json.dumps(summary, indent=1))):
        write_text_atomic(output / name, text)
    png = chart(summaries, output / ".compare.tmp.png")
    if png is not None:
        png.replace(output / "compare.png")


__all__ = ["compare", "read_row", "markdown", "summary_markdown", "write_report"]
