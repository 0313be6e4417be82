"""Standard benchmarks through lm-evaluation-harness, run in-process on the model tuneforge holds (base + adapter).

``tuneforge eval --tasks NAME[,NAME]`` and ``--general-eval tasks:NAME[,NAME]`` in training both come here. A task is
an lm-eval name (``mmlu``, ``arc_easy``, ``hellaswag``: their data sets come from the Hugging Face hub) or a local
task in lm-eval's YAML format: a ``.yaml`` file, or a folder of them (every task in it). A local task reads local
data with ``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: data.jsonl}}``, so it needs no hub (the
datasets library reads a relative ``data_files`` path from the working directory, not from the YAML's folder).

The model is lm-eval's ``HFLM`` around the module already in memory: nothing is saved, merged or served, and an
adapter is measured exactly as it computes in training (``handle.disabled()`` around a call measures the base).
lm-eval is imported only when tasks are evaluated or checked (``pip install 'tuneforge[eval]'``).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import ConfigError

log = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")
INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'tuneforge[eval]' (or lm-eval)"


def parse_tasks(value: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (blanks dropped, order and duplicates kept out)."""
    items = [value] if isinstance(value, str) else list(value)
    names = [name.strip() for item in items for name in str(item).split(",")]
    return list(dict.fromkeys(name for name in names if name))


def is_local_task(name: str) -> bool:
    """A path to a task YAML or a folder of them, rather than an lm-eval task name."""
    return name.endswith(YAML_SUFFIXES) or "/" in name or Path(name).is_dir()


def local_task_paths(tasks: Sequence[str]) -> list[str]:
    """The local task files and folders among ``tasks`` (inputs a run must not write over, and fingerprints)."""
    return [name for name in tasks if is_local_task(name)]


@dataclass
class TaskList:
    """Tasks as lm-eval loads them: names (and YAML paths), the folders of local tasks to index, and whether any name
    is one of lm-eval's own (indexing those reads ~15k YAML files, ~10 s: skipped when every task is local)."""

    specs: list[str]
    include: list[str] = field(default_factory=list)
    builtin: bool = False


def resolve_tasks(tasks: Sequence[str]) -> TaskList:
    """Check the local paths exist and sort the list into what ``TaskManager`` needs; lm-eval is not imported."""
    if not tasks:
        raise ConfigError("--tasks: give at least one lm-eval task name or a task YAML / folder of them")
    resolved = TaskList(specs=[])
    for name in tasks:
        if not is_local_task(name):
            resolved.specs.append(name)
            resolved.builtin = True
            continue
        path = Path(name).expanduser()
        if path.is_dir():
            resolved.include.append(str(path.resolve()))
            resolved.specs.append(str(path.resolve()))  # expanded into its tasks once indexed (Benchmarks)
        elif path.is_file() and path.suffix in YAML_SUFFIXES:
            # Its folder is indexed too, so a group or `include:` naming a sibling task resolves.
            resolved.include.append(str(path.resolve().parent))
            resolved.specs.append(str(path.resolve()))
        else:
            raise ConfigError(f"task {name}: no such task YAML file or folder")
    resolved.include = list(dict.fromkeys(resolved.include))
    return resolved


def import_lm_eval():
    try:
        import lm_eval
    except ModuleNotFoundError as e:
        if e.name != "lm_eval":
            raise
        raise ConfigError(INSTALL_HINT) from None
    return lm_eval


class Benchmarks:
    """A task list checked once (lm-eval's task index built, every name found), then evaluated on any model: the
    trainer measures the same tasks before and after training."""

    def __init__(self, tasks: str | Sequence[str], *, limit: int | float | None = None, batch_size: int = 8):
        self.tasks = resolve_tasks(parse_tasks(tasks))
        self.limit, self.batch_size = limit, batch_size
        import_lm_eval()
        from lm_eval.tasks import TaskManager

        self.manager = TaskManager(include_path=self.tasks.include or None, include_defaults=self.tasks.builtin)
        self.specs = [name for spec in self.tasks.specs for name in self._expand(spec)]

    def _expand(self, spec: str) -> list[str]:
        """What ``TaskManager.load`` takes for one spec: a folder becomes its tasks; a name must be indexed."""
        from lm_eval.tasks._index import Kind, TaskIndex

        path = Path(spec)
        if path.is_dir():
            found = sorted(name for name, entry in self.manager.task_index.items()
                           if entry.kind in (Kind.TASK, Kind.PY_TASK) and entry.yaml_path is not None
                           and path in entry.yaml_path.resolve().parents)
            if not found:
                raise ConfigError(f"task folder {spec}: no lm-eval task YAML in it (a file with a `task:` key)")
            return found
        if path.is_file():
            import yaml

            try:
                entry = TaskIndex.entry_from_path(path)
            except (ValueError, yaml.YAMLError) as e:  # lm-eval: "Unknown config shape: keys=[...]"
                raise ConfigError(f"task {spec}: not an lm-eval task YAML ({' '.join(str(e).split())})") from None
            if entry is None:
                raise ConfigError(f"task {spec}: not an lm-eval task YAML (no `task:` or `group:` key)")
            return [spec]
        if spec not in self.manager.all_tasks:
            close = difflib.get_close_matches(spec, self.manager.all_tasks, n=3)
            raise ConfigError(f"unknown lm-eval task {spec!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                   else "") + " (or give a path to a task YAML)")
        return [spec]

    def evaluate(self, model, tokenizer) -> dict[str, dict[str, Any]]:
        """Every task on ``model`` as it is (an adapter attached counts; training mode is restored afterwards):
        ``{task: {"metrics": {name: value}, "stderr": {name: value}, "primary": name, "higher_is_better": bool,
        "n": documents}}`` for each task asked for (a group: its aggregate, not its subtasks). Under torchrun every
        rank evaluates every document (an FSDP forward needs all ranks); only rank 0 gets results, the others ``{}``."""
        out = self.run(model, tokenizer)
        return summarise(out) if out is not None else {}

    def run(self, model, tokenizer, *, log_samples: bool = False) -> dict[str, Any] | None:
        """lm-eval's own output of ``simple_evaluate`` (with per-document ``samples`` when ``log_samples``)."""
        import_lm_eval()
        from lm_eval import simple_evaluate

        from .generate import eval_mode

        with eval_mode(model), _no_retie(model):
            lm = _hflm(model, tokenizer, self.batch_size)
            # No random seeds: the run's RNG (data order, dropout) must not depend on whether it was evaluated.
            # Greedy decoding and lm-eval's own few-shot seed make the numbers repeatable anyway.
            return simple_evaluate(model=lm, tasks=self.specs, limit=self.limit, task_manager=self.manager,
                                   log_samples=log_samples, random_seed=None, numpy_random_seed=None,
                                   torch_random_seed=None)


@contextlib.contextmanager
def _no_retie(model) -> Iterator[None]:
    """HFLM calls ``model.tie_weights()`` on the model it is given, as if it had just loaded it. Ours is measured as
    the run holds it: were its config to say "tied" over a head that is not (one trained apart), re-tying would
    replace that head. Loading tied what was tied is done already; skip the call."""
    model.tie_weights = lambda *args, **kwargs: None  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.tie_weights


def _hflm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    # HFLM warns that a model passed as an object ignores its loading options; there are none to ignore here.
    logger = logging.getLogger("lm_eval.models.huggingface")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        logger.setLevel(level)


def summarise(out: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``results`` ("acc,none": 0.5, "acc_stderr,none": 0.1 ...) as one entry per task asked for."""
    nested = {name for subtasks in out.get("group_subtasks", {}).values() for name in subtasks}
    rows: dict[str, Any] = {}
    for task, values in out["results"].items():
        if task in nested:
            continue
        metrics: dict[str, float | None] = {}
        stderr: dict[str, float | None] = {}
        bases: dict[str, str] = {}  # our name -> lm-eval's metric name (its higher_is_better is keyed by that)
        for key, value in values.items():
            metric, sep, filter_name = key.partition(",")
            if not sep:  # "alias", "name", "sample_len"
                continue
            base = metric.removesuffix("_stderr")
            name = base if filter_name == "none" else f"{base}_{filter_name}"  # gsm8k: exact_match_strict-match
            if metric.endswith("_stderr"):
                stderr[name] = _number(value)
            else:
                metrics[name], bases[name] = _number(value), base
        if not metrics:
            continue
        primary = next(iter(metrics))  # the first metric the task lists
        better = out.get("higher_is_better", {}).get(task, {}).get(bases[primary], True)
        samples = out.get("n-samples", {})
        n = samples.get(task, {}).get("effective")
        if n is None:  # a group: the documents of its subtasks
            n = sum(samples.get(sub, {}).get("effective", 0) for sub in out.get("group_subtasks", {}).get(task, []))
        rows[task] = {"metrics": metrics, "stderr": stderr, "primary": primary, "higher_is_better": bool(better),
                      "n": n}
    return rows


def _number(value: Any) -> float | None:
    """A metric value as a float; lm-eval writes "N/A" for a stderr it could not compute."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# -- before / after in training -----------------------------------------------------------------------------


def key_part(name: str) -> str:
    """A task or metric name as part of a metrics key: letters, digits, ``_``, ``-`` and ``.`` kept."""
    return re.sub(r"[^\w.-]+", "_", name)


def flat_metrics(results: dict[str, Any], when: str) -> dict[str, float]:
    """``benchmark_<task>_<metric>_<when>`` (and ``..._<metric>_stderr_<when>``) for every task's metrics."""
    flat: dict[str, float] = {}
    for task, row in results.items():
        for kind, suffix in (("metrics", ""), ("stderr", "_stderr")):
            for metric, value in row[kind].items():
                if value is not None:
                    flat[f"benchmark_{key_part(task)}_{key_part(metric)}{suffix}_{when}"] = value
    return flat


def primary_keys(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task, its primary metric and the metrics keys that hold it (summary.json's ``benchmarks``, which the
    train summary and ``compare`` read, so that nobody parses ``benchmark_<task>_<metric>_before`` back)."""
    keys = {}
    for task, row in results.items():
        stem = f"benchmark_{key_part(task)}_{key_part(row['primary'])}"
        keys[task] = {"metric": row["primary"], "n": row["n"], "higher_is_better": row["higher_is_better"],
                      "before": f"{stem}_before", "after": f"{stem}_after",
                      "forgetting": f"forgetting_{key_part(task)}"}
    return keys


def forgetting(metrics: dict[str, Any], keys: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``forgetting_<task>``: how much the task's primary metric got worse, before - after where higher is better
    (so > 0 means the run lost ability there, as the general-text ``forgetting`` is a loss increase)."""
    found = {}
    for entry in keys.values():
        if entry["before"] in metrics and entry["after"] in metrics:
            delta = metrics[entry["before"]] - metrics[entry["after"]]
            found[entry["forgetting"]] = delta if entry["higher_is_better"] else -delta
    return found


def table(results: dict[str, Any]) -> str:
    """One line per task and metric: ``task  metric  value ± stderr  n``."""
    lines = [("task", "metric", "value", "stderr", "n")]
    for task, row in results.items():
        for i, (metric, value) in enumerate(row["metrics"].items()):
            err = row["stderr"].get(metric)
            lines.append((task if i == 0 else "", metric, "n/a" if value is None else f"{value:.4f}",
                          "" if err is None else f"± {err:.4f}", str(row["n"]) if i == 0 else ""))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


__all__ = ["Benchmarks", "parse_tasks", "resolve_tasks", "local_task_paths", "summarise", "flat_metrics",
           "forgetting", "primary_keys", "table"]
