"""``tuneforge sweep``: a hyperparameter search on Optuna, each trial an ordinary run folder (docs/sweep.md).

The search space is a set of config keys with candidate values (``--search lora_r=4,8,16 --search
learning_rate=log:1e-5..1e-3``, or ``sweep: {search: ...}`` in the config file); Optuna's TPE or grid sampler
proposes each trial's values; the trial is ``tuneforge train`` in a child process, writing ``SWEEP/trial-NNNN``.
While it trains, its ``metrics.jsonl`` is read as it grows: each periodic eval loss (``eval_every``) is reported to
the pruner (median or Hyperband), which stops the trial when it trails the trials before it at the same step. The
trial's value is any metric of its ``summary.json`` (eval loss, exact match, preference accuracy, forgetting) or a
weighted sum of them.

The study lives in Optuna's own SQLite database, ``SWEEP/optuna.db`` (``optuna-dashboard sqlite:///SWEEP/optuna.db``
opens it). It is the source of truth: a killed sweep, run again with the same command, counts the trials it finished
(complete or pruned), marks the one the kill interrupted as failed and queues its values again, and goes on.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..flags import parse_value, read_yaml_mapping

log = logging.getLogger(__name__)

STUDY_NAME = "tuneforge"
DATABASE = "optuna.db"
SPEC_FILE = "sweep.json"
SWEEP_KEY = "sweep"
POLL_SECONDS = 0.5
# Objective names that read a metric under another name; the summary's own keys are accepted as they are.
METRIC_ALIASES = {"exact_match": ("exact_match_after",), "loss": ("eval_loss",),
                  "preference_accuracy": ("eval_accuracy", "eval_rewards/accuracies")}
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "forgetting")


# -- the search space -----------------------------------------------------------------------------------


@dataclass
class Dimension:
    """One searched config key: a list of ``choices``, or a ``low..high`` range (``log``-scaled, ``integer``)."""

    key: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def candidates(self) -> list[Any]:
        """Values that must each make a valid config: every choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def describe(self) -> str:
        if self.choices is not None:
            return ",".join(map(str, self.choices))
        return f"{'int:' if self.integer else ''}{'log:' if self.log else ''}{self.low:g}..{self.high:g}"


RANGE = re.compile(r"(?P<int>int:)?(?P<log>log:)?(?P<low>[^.]+(?:\.\d+)?(?:e-?\d+)?)\.\.(?P<high>.+)")


def parse_dimension(key: str, spec: Any, where: str) -> Dimension:
    """``4,8,16`` or a YAML list: choices; ``LOW..HIGH``, ``log:LOW..HIGH``, ``int:LOW..HIGH``: a range."""
    key = key.strip().replace("-", "_")
    if isinstance(spec, list):
        choices = spec
    else:
        text = str(spec).strip()
        match = RANGE.fullmatch(text)
        if match:
            return _range(key, match, where)
        value = parse_value(text)
        choices = value if isinstance(value, list) else [value]
    if not choices:
        raise ConfigError(f"{where}: {key}: no values to search")
    if len({json.dumps(c, sort_keys=True, default=str) for c in choices}) != len(choices):
        raise ConfigError(f"{where}: {key}: a value repeats ({spec})")
    return Dimension(key, choices=choices)


def _range(key: str, match: re.Match, where: str) -> Dimension:
    low, high = parse_value(match["low"]), parse_value(match["high"])
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"{where}: {key}: a range is LOW..HIGH with two numbers, got {match.group(0)!r}")
    if not low < high:
        raise ConfigError(f"{where}: {key}: the range's low end {low:g} must be below its high end {high:g}")
    if match["log"] and low <= 0:
        raise ConfigError(f"{where}: {key}: a log range needs a low end above 0, got {low:g}")
    integer = bool(match["int"]) or (isinstance(low, int) and isinstance(high, int))
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: {key}: an int range needs whole numbers, got {match.group(0)!r}")
    return Dimension(key, low=low, high=high, log=bool(match["log"]), integer=integer)


def parse_search_flags(values: list[str]) -> dict[str, Any]:
    """``--search KEY=SPEC`` (repeatable) as ``{key: spec}``."""
    out = {}
    for value in values:
        key, eq, spec = value.partition("=")
        if not eq or not key.strip() or not spec.strip():
            raise ConfigError(f"--search {value!r}: expected KEY=VALUES, e.g. --search lora_r=4,8,16 or "
                              "--search learning_rate=log:1e-5..1e-3")
        if key.strip() in out:
            raise ConfigError(f"--search {key.strip()}: given twice")
        out[key.strip()] = spec
    return out


# -- the objective ----------------------------------------------------------------------------------------

TERM = re.compile(r"\s*(?P<sign>[+-])?\s*(?:(?P<weight>\d+(?:\.\d*)?(?:e-?\d+)?)\s*\*\s*)?(?P<name>[A-Za-z_][\w/]*)\s*")


@dataclass
class Objective:
    """A metric of the trials' summaries, or a weighted sum ``0.7*exact_match - 0.3*forgetting``."""

    terms: list[tuple[float, str]]
    direction: str
    text: str = ""

    def value(self, metrics: dict[str, Any]) -> float:
        total = 0.0
        for weight, name in self.terms:
            total += weight * float(metric(metrics, name))
        return total


def metric(metrics: dict[str, Any], name: str) -> Any:
    """``name``'s value in a run's summary (aliases: exact_match, preference_accuracy); KeyError naming the choices."""
    for key in (name, *METRIC_ALIASES.get(name, ())):
        if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool):
            return metrics[key]
    numbers = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    raise KeyError(f"the objective's metric {name!r} is not in the trial's summary.json; it has: {', '.join(numbers)}")


def parse_objective(text: str, direction: str | None) -> Objective:
    terms, position = [], 0
    while position < len(text):
        match = TERM.match(text, position)
        if not match or match.end() == position or (terms and not match["sign"]):
            raise ConfigError(f"--objective {text!r}: expected a metric name or a sum like "
                              "'0.7*exact_match - 0.3*forgetting'")
        weight = float(match["weight"]) if match["weight"] else 1.0
        terms.append((-weight if match["sign"] == "-" else weight, match["name"]))
        position = match.end()
    if not terms:
        raise ConfigError("--objective: empty; name a metric such as eval_loss or exact_match")
    if direction is None:
        if len(terms) > 1:
            raise ConfigError(f"--objective {text!r}: a weighted sum needs --direction minimize or maximize")
        lower = any(word in terms[0][1] for word in LOWER_IS_BETTER)
        direction = "minimize" if (lower == (terms[0][0] > 0)) else "maximize"
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"--direction {direction!r}: minimize or maximize")
    return Objective(terms, direction, text)


# -- the sweep --------------------------------------------------------------------------------------------


@dataclass
class SweepSpec:
    """Everything that defines a sweep; a resumed sweep must be given the same."""

    output: Path
    search: list[Dimension]
    objective: Objective
    trials: int
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    config_path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    side_by_side: int = 1

    def record(self) -> dict[str, Any]:
        return {"search": {d.key: d.describe() for d in self.search}, "objective": self.objective.text,
                "direction": self.objective.direction, "sampler": self.sampler, "pruner": self.pruner,
                "seed": self.seed, "config": self.config_path, "overrides": self.overrides,
                "side_by_side": self.side_by_side}


def build_spec(config_path: str | None, overrides: dict[str, Any], search_flags: dict[str, Any], *,
               output: str | None, trials: int | None, sampler: str | None, pruner: str | None,
               objective: str | None, direction: str | None, seed: int | None,
               side_by_side: int | None = None) -> SweepSpec:
    """The sweep from the config file's ``sweep:`` section and the flags (flags win), every trial's config checked:
    a bad key or value fails here, in one line, before anything trains."""
    section: dict[str, Any] = {}
    if config_path is not None:
        data = read_yaml_mapping(config_path)
        section = data.get(SWEEP_KEY) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{config_path}: {SWEEP_KEY}: expected a mapping (search, trials, objective, ...)")
        unknown = set(section) - {"search", "trials", "sampler", "pruner", "objective", "direction", "seed", "output",
                                  "side_by_side"}
        if unknown:
            raise ConfigError(f"{config_path}: {SWEEP_KEY}: unknown key(s) {', '.join(sorted(unknown))}")
    where = f"{config_path}: {SWEEP_KEY}.search" if config_path and section.get("search") else "--search"
    raw = {**(section.get("search") or {}), **search_flags}
    if not raw:
        raise ConfigError("tuneforge sweep: nothing to search; give --search KEY=VALUES (or sweep: {search: ...})")
    search = [parse_dimension(k, v, "--search" if k in search_flags else where) for k, v in raw.items()]
    sampler = sampler or section.get("sampler", "tpe")
    pruner = pruner or section.get("pruner", "median")
    if sampler not in ("tpe", "grid"):
        raise ConfigError(f"--sampler {sampler!r}: tpe or grid")
    if pruner not in ("median", "hyperband", "none"):
        raise ConfigError(f"--pruner {pruner!r}: median, hyperband or none")
    if sampler == "grid":
        ranges = [d.key for d in search if d.choices is None]
        if ranges:
            raise ConfigError(f"--sampler grid needs lists of values; {', '.join(ranges)} is a range")
    grid_size = math.prod(len(d.choices) for d in search) if sampler == "grid" else None
    trials = trials or section.get("trials") or grid_size or 8
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials {trials!r}: a positive number of trials")
    spec = SweepSpec(Path(output or section.get("output") or "runs/sweep"), search,
                     parse_objective(objective or section.get("objective", "eval_loss"),
                                     direction or section.get("direction")),
                     trials, sampler, pruner, seed if seed is not None else int(section.get("seed", 0)),
                     config_path, overrides, side_by_side or int(section.get("side_by_side", 1)))
    if spec.side_by_side < 1:
        raise ConfigError(f"--side-by-side {spec.side_by_side}: trials per process, at least 1")
    check_trial_configs(spec)
    return spec


def trial_config(spec: SweepSpec, params: dict[str, Any], output: Path):
    """A trial's RunConfig: the base config, the flags, the trial's values, its own run folder."""
    from ..config import load_config

    values = {**spec.overrides, **params, "output": str(output), "overwrite": True, "progress": False}
    base = dict(read_yaml_mapping(spec.config_path)) if spec.config_path else {}
    base.pop(SWEEP_KEY, None)
    try:
        config = load_config(None, {**base, **values})
    except ConfigError as e:
        raise ConfigError(str(e).replace("command line: ", "")) from None
    if spec.pruner != "none" and config.eval_every is None:
        # The pruner needs evals along the way: about four per trial unless the config sets its own.
        steps = config.max_steps
        if steps is None:
            raise ConfigError("--pruner needs evaluations during training: set --eval-every (or --max-steps), or "
                              "--pruner none")
        config = config.model_copy(update={"eval_every": max(1, steps // 4)})
    return config


def check_trial_configs(spec: SweepSpec) -> None:
    """Every candidate value of every searched key (the others at their first candidate) makes a valid run config."""
    from ..config import route_key

    first = {d.key: d.candidates()[0] for d in spec.search}
    for d in spec.search:
        try:
            route_key(d.key, first[d.key], {})
        except ConfigError as e:
            raise ConfigError(f"--search {d.key}: {e}") from None
        for value in d.candidates():
            try:
                trial_config(spec, {**first, d.key: value}, spec.output / "check")
            except ConfigError as e:
                raise ConfigError(f"--search {d.key}={value}: {e}") from None
    if spec.side_by_side > 1:
        check_side_by_side(spec, first)


def check_side_by_side(spec: SweepSpec, first: dict[str, Any]) -> None:
    """``--side-by-side``: every candidate value can share a process with every other (the keys searched are
    those side-by-side adapters may differ in, the method is plain LoRA, ...), or the reason why not."""
    from ..run.multi_adapter import lanes_from_configs

    configs = [trial_config(spec, first, spec.output / "check-0")]
    names = [", ".join(f"{k}={v}" for k, v in first.items())]
    for d in spec.search:
        for value in d.candidates():
            configs.append(trial_config(spec, {**first, d.key: value}, spec.output / f"check-{len(configs)}"))
            names.append(f"{d.key}={value}")
    try:
        lanes_from_configs(configs, names)
    except ConfigError as e:
        raise ConfigError(f"--side-by-side: {str(e).removeprefix('side-by-side: ')}") from None


def open_study(spec: SweepSpec):
    """The study in ``SWEEP/optuna.db``: created, or loaded as the killed sweep left it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.sampler == "grid":
        sampler = optuna.samplers.GridSampler({d.key: d.choices for d in spec.search}, seed=spec.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, max(2, spec.trials // 3)))
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if spec.pruner == "median":  # from the second trial on: a sweep of a few trials still prunes
        pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    elif spec.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1)
    storage = f"sqlite:///{(spec.output / DATABASE).resolve()}"
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner,
                               direction=spec.objective.direction, load_if_exists=True)


def check_same_sweep(spec: SweepSpec) -> None:
    """A sweep folder is continued only by the sweep that made it: a changed space would mix two searches."""
    path = spec.output / SPEC_FILE
    record = json.loads(json.dumps(spec.record(), default=str))
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != record:
            changed = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
            raise ConfigError(f"{spec.output} holds a sweep with other settings ({', '.join(changed)}); run it with "
                              "its own settings to continue it, or choose another --output")
    else:
        from ..outputs import check_not_input

        check_not_input(str(spec.output), [spec.config_path])
        if spec.output.is_dir() and any(spec.output.iterdir()):
            raise ConfigError(f"--output {spec.output} exists and holds no sweep; choose another --output")
        spec.output.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")


def recover_interrupted(study) -> int:
    """Trials a killed sweep left running: marked failed (``interrupted``) and their values queued again."""
    from optuna.trial import TrialState

    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        count += 1
    return count


def finished_trials(study) -> list:
    """Trials that count toward ``--trials``: complete, pruned, or failed by themselves (not by a kill)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]


def trial_dir(spec: SweepSpec, number: int) -> Path:
    return spec.output / f"trial-{number:04d}"


def run_sweep(spec: SweepSpec) -> dict[str, Any]:
    """Run trials until ``spec.trials`` have finished; returns the study's summary (best trial and folder)."""
    from ..run.checkpoint import OutputLock

    check_same_sweep(spec)
    with OutputLock(spec.output):  # one sweep process per folder: a second would mark the first's trial failed
        study = open_study(spec)
        if spec.sampler == "grid" and not study.trials:
            # Every combination queued in the order given (GridSampler alone would shuffle them).
            for values in itertools.product(*(d.choices for d in spec.search)):
                study.enqueue_trial(dict(zip((d.key for d in spec.search), values)))
        interrupted = recover_interrupted(study)
        if interrupted:
            log.info("resuming: %d interrupted trial(s) queued again; %d finished trial(s) kept", interrupted,
                     len(finished_trials(study)))
        while len(finished_trials(study)) < spec.trials:
            batch = min(spec.side_by_side, spec.trials - len(finished_trials(study)))
            if batch > 1:
                run_side_by_side(spec, study, batch)
            else:
                run_trial(spec, study)
    return summary(spec, study)


def run_trial(spec: SweepSpec, study) -> None:
    import optuna
    from optuna.trial import TrialState

    trial = study.ask()
    params = {d.key: d.suggest(trial) for d in spec.search}
    output = trial_dir(spec, trial.number)
    config = trial_config(spec, params, output)
    trial.set_user_attr("output", str(output))
    log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
    try:
        metrics = train_watched(config, trial, spec.objective.direction)
        value = spec.objective.value(metrics)
    except optuna.TrialPruned as e:
        log.info("trial %d pruned: %s", trial.number, e)
        trial.set_user_attr("pruned", str(e))
        study.tell(trial, state=TrialState.PRUNED)
        return
    except TrialFailed as e:
        log.warning("trial %d failed: %s", trial.number, e)
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, value)
    log.info("trial %d: %s = %.6g", trial.number, spec.objective.text, value)


class TrialFailed(RuntimeError):
    """A trial's training ended with an error (diverged, bad value for this model): the sweep goes on."""


def train_watched(config, trial, direction: str) -> dict[str, Any]:
    """``tuneforge train`` on the trial's config in a child process; each new eval loss in its metrics.jsonl goes
    to the pruner, which may stop it. Returns the run's summary.json."""
    from ..config import save_config

    output = Path(config.output)
    config_file = output.with_name(output.name + ".yaml")
    save_config(config, config_file)
    watch_child(config_file, output.with_name(output.name + ".log"), [(trial, output)], direction, prune=True)
    return json.loads((output / "summary.json").read_text())


def watch_child(config_file: Path, stderr_path: Path, trials: list[tuple[Any, Path]], direction: str,
                prune: bool) -> None:
    """Run ``tuneforge train CONFIG_FILE``, reporting each trial's eval losses as its ``metrics.jsonl`` grows;
    with ``prune``, stop the child when the (one) trial should be pruned. TrialFailed on a failed run."""
    import optuna

    sign = 1.0 if direction == "minimize" else -1.0  # the pruner reads eval loss the study's way round
    reported: list[dict[int, float]] = [{} for _ in trials]
    with open(stderr_path, "w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(config_file)],
                                 stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            while True:
                done = child.poll() is not None
                for (trial, output), seen in zip(trials, reported):
                    report_evals(output / "metrics.jsonl", seen, trial, sign)
                    if prune and seen and trial.should_prune():
                        step = max(seen)
                        raise optuna.TrialPruned(f"eval loss {seen[step]:.4g} at step {step} trails the trials "
                                                 "before it")
                if done:
                    break
                time.sleep(POLL_SECONDS)
        finally:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                child.wait()
    if child.returncode != 0:
        lines = [line for line in stderr_path.read_text().splitlines() if line.strip()]
        raise TrialFailed(lines[-1] if lines else f"tuneforge train exited with {child.returncode}")


def run_side_by_side(spec: SweepSpec, study, count: int) -> None:
    """``count`` trials trained as one side-by-side run (``run/multi_adapter.py``): one process, one base, each
    trial a lane with its own run folder. Their eval losses reach the pruner, but lanes of one process are not
    stopped one by one: each batch trains to its end."""
    from optuna.trial import TrialState

    trials = [study.ask() for _ in range(count)]
    params = [{d.key: d.suggest(trial) for d in spec.search} for trial in trials]
    outputs = [trial_dir(spec, trial.number) for trial in trials]
    lanes = []
    for trial, values, output in zip(trials, params, outputs):
        trial.set_user_attr("output", str(output))
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in values.items()))
        lanes.append({"name": output.name, **trial_config(spec, values, output).model_dump(mode="json")})
    config_file = spec.output / f"batch-{trials[0].number:04d}.yaml"
    config_file.write_text(yaml.safe_dump({"adapters": lanes}, sort_keys=False))
    try:
        watch_child(config_file, config_file.with_suffix(".log"), list(zip(trials, outputs)),
                    spec.objective.direction, prune=False)
    except TrialFailed as e:
        log.warning("trials %s failed: %s", ", ".join(str(t.number) for t in trials), e)
        for trial in trials:
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
        return
    for trial, output in zip(trials, outputs):
        value = spec.objective.value(json.loads((output / "summary.json").read_text()))
        study.tell(trial, value)
        log.info("trial %d: %s = %.6g", trial.number, spec.objective.text, value)


def report_evals(log_path: Path, reported: dict[int, float], trial, sign: float) -> None:
    """Report each eval loss of the complete lines of ``metrics.jsonl`` not reported yet (``reported``: by step)."""
    if not log_path.is_file():
        return
    lines = log_path.read_text().split("\n")[:-1]  # the last element is a line still being written, or ""
    for line in lines:
        record = json.loads(line)
        step = record.get("step", 0)
        if "eval_loss" in record and step > 0 and step not in reported:
            value = float(record["eval_loss"])
            reported[step] = value
            trial.report(sign * value if math.isfinite(value) else float("nan"), step)


def summary(spec: SweepSpec, study) -> dict[str, Any]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.state == TrialState.COMPLETE else None  # a pruned trial's is its last eval loss
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": value, "params": t.params,
                     "note": t.user_attrs.get("pruned") or t.user_attrs.get("error"),
                     "output": t.user_attrs.get("output"), **({"interrupted": True} if t.user_attrs.get("interrupted")
                                                              else {})})
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = study.best_trial if complete else None
    result = {"objective": spec.objective.text, "direction": spec.objective.direction, "trials": rows,
              "best": None if best is None else {"trial": best.number, "value": best.value, "params": best.params,
                                                  "output": best.user_attrs.get("output")},
              "storage": f"sqlite:///{(spec.output / DATABASE).resolve()}"}
    (spec.output / "best.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


__all__ = ["Dimension", "Objective", "SweepSpec", "build_spec", "parse_dimension", "parse_objective",
           "parse_search_flags", "run_sweep"]
