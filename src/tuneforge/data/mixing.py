"""Several data sources, mixed by weight: ``--data domain.jsonl:0.8 --data general:0.2``, or in YAML::

    data:
      - domain.jsonl:0.8
      - {path: general, weight: 0.2}

The mix keeps the size of the data the user gave (the sources' record counts added up) and gives source *i*
``round(wᵢ / Σw x total)`` examples (largest remainders, so the counts add up exactly). A source takes its
examples without replacement from a seeded shuffle of its records, reshuffled for each further pass, so a small
source repeats (general-data replay) and a large one is subsampled. Everything depends on the seed alone.

``general`` names the built-in general-text set's replay split (``assets/general/train.jsonl``, text the embedded
model wrote; see ``examples/make_general_set.py``): continued pretraining on a domain forgets less with some of it
mixed in. Its ``eval`` split, never mixed in, measures forgetting (``--general-eval builtin``).

A source without a weight is used whole; weights are given for every source of a mix or for none (a plain
concatenation). ``eval_split`` holds out that fraction of each source before mixing, so no repeat of a held-out
record can reach training.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .formats import DataError, Example, load_examples

if TYPE_CHECKING:
    from .streaming import RecordStream

log = logging.getLogger(__name__)

GENERAL_DIR = Path(__file__).parents[1] / "assets" / "general"
GENERAL_SOURCE = "general"  # a data source name: the built-in general-text replay set
GENERAL_EVAL = "builtin"  # a --general-eval value: the built-in set's held-out split
GENERAL_EVAL_TASKS = "tasks:"  # --general-eval prefix: lm-eval tasks (inference/benchmarks.py)


@dataclass(frozen=True)
class DataSource:
    path: str
    weight: float | None = None

    @property
    def file(self) -> str:
        """The file (or hub id) to read: ``general`` is the built-in replay set unless such a file exists."""
        if self.path == GENERAL_SOURCE and not Path(self.path).exists():
            return str(GENERAL_DIR / "train.jsonl")
        return self.path


@dataclass
class LoadedData:
    train: list[Example]
    eval: list[Example]
    sources: list[dict[str, Any]] = field(default_factory=list)  # per source: records, weight, examples drawn
    stream: RecordStream | None = None  # --streaming: the training records, read as training goes (train is empty)


def parse_source(entry: Any) -> DataSource:
    """``"path"``, ``"path:0.8"`` or ``{path: ..., weight: 0.8}``. A hub id's ``:split`` is not a weight: only a
    number after the last colon is."""
    if isinstance(entry, dict):
        unknown = set(entry) - {"path", "weight"}
        if unknown or "path" not in entry:
            raise ValueError(f"a data source mapping needs 'path' (and optionally 'weight'), got keys {sorted(entry)}")
        return DataSource(str(entry["path"]), _weight(entry.get("weight"), entry))
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"a data source is a path, 'path:weight' or {{path, weight}}, got {entry!r}")
    head, sep, tail = entry.rpartition(":")
    if sep and head:
        try:
            return DataSource(head, _weight(float(tail), entry))
        except ValueError as e:
            if "weight" in str(e):
                raise
    return DataSource(entry)


def _weight(value: Any, entry: Any) -> float | None:
    if value is None:
        return None
    weight = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            weight = float(value)
        except OverflowError:  # an integer past float's range (YAML reads 10**400 as one)
            weight = math.inf
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"data source {entry!r}: the weight must be a positive number (finite, not NaN), "
                         f"got {value!r}")
    return weight


def relative_weights(weights: list[float]) -> list[float]:
    """The weights as shares summing to 1. Weights whose sum overflows (1e308 each) are divided by the largest
    first, so that they mean what equal weights mean instead of all becoming 0 / infinity = 0."""
    if not math.isfinite(sum(weights)):
        weights = [w / max(weights) for w in weights]
    total = sum(weights)
    return [w / total for w in weights]


def parse_sources(data: str | list[Any] | None) -> list[DataSource]:
    """The run's ``data`` value as sources; checks that weights are given for all sources or for none."""
    if data is None:
        return []
    sources = [parse_source(e) for e in (data if isinstance(data, list) else [data])]
    if not sources:
        raise ValueError("data: the list of sources is empty")
    weighted = [s.weight is not None for s in sources]
    if len(sources) > 1 and any(weighted) and not all(weighted):
        missing = [s.path for s in sources if s.weight is None]
        raise ValueError(f"data: give every source a weight or none; no weight for {', '.join(missing)}")
    return sources


def mix_counts(sizes: list[int], weights: list[float] | None, total: int | None = None) -> list[int]:
    """Examples per source: proportional to the weights, summing to ``total`` (default: all records)."""
    total = sum(sizes) if total is None else total
    if weights is None:
        return list(sizes)
    shares = np.asarray(relative_weights(weights)) * total
    counts = np.floor(shares).astype(int)
    leftover = total - int(counts.sum())
    for i in np.argsort(-(shares - counts), kind="stable")[:leftover]:  # largest remainders get the rest
        counts[i] += 1
    return counts.tolist()


def draw(n_records: int, count: int, seed: int, index: int) -> list[int]:
    """``count`` record indices: successive seeded shuffles of ``range(n_records)`` (each pass a new one)."""
    out: list[int] = []
    rng = np.random.default_rng([seed, index])
    while len(out) < count:
        out += rng.permutation(n_records).tolist()[:count - len(out)]
    return out


def hold_out(examples: list[Example], fraction: float, seed: int, index: int = 0
             ) -> tuple[list[Example], list[Example]]:
    if fraction <= 0:
        return examples, []
    order = np.random.default_rng(seed if index == 0 else [seed, index]).permutation(len(examples))
    n_eval = max(1, int(round(len(examples) * fraction)))
    held = set(order[:n_eval].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def load_mixed(data: str | list[Any], data_format: str, seed: int, eval_split: float = 0.0) -> LoadedData:
    """Read every source, hold out ``eval_split`` of each, and mix the rest by weight."""
    sources = parse_sources(data)
    parts, held = [], []
    for i, source in enumerate(sources):
        train, eval_ = hold_out(load_examples(source.file, data_format), eval_split, seed, i)
        if not train:
            raise DataError(f"{source.path}: eval_split {eval_split} leaves no training record")
        parts.append(train)
        held += eval_
    weighted = len(sources) > 1 and sources[0].weight is not None
    counts = mix_counts([len(p) for p in parts], [s.weight for s in sources] if weighted else None)
    mixed: list[Example] = []
    summary = []
    for i, (source, part, count) in enumerate(zip(sources, parts, counts)):
        mixed += [part[j] for j in draw(len(part), count, seed, i)] if weighted else part
        summary.append({"source": source.path, "records": len(part), "weight": source.weight, "examples": count,
                        "share": round(count / max(sum(counts), 1), 4)})
        if weighted:
            warn_if_skewed(source, len(part), count)
    return LoadedData(mixed, held, summary)


def warn_if_skewed(source: DataSource, records: int, count: int) -> None:
    """Say when a weight repeats a source's records (upsampling: the run sees the same records again) or leaves
    the source out altogether; either may be meant (general-data replay repeats), neither should be a surprise."""
    if count > records:
        log.warning("data source %s: weight %g draws %d examples from its %d records: each record repeats "
                    "%.1f times on average (upsampled)", source.path, source.weight, count, records, count / records)
    elif count == 0:
        log.warning("data source %s: weight %g is too small to draw any example from it; it is not used",
                    source.path, source.weight)


def general_eval_file(value: str | None) -> str | None:
    """The file ``--general-eval`` names: ``builtin`` is the shipped general set's held-out split; none for
    ``tasks:...`` (benchmarks, see ``general_eval_tasks``)."""
    if value is None or value.lower() in ("none", "off", "false") or value.startswith(GENERAL_EVAL_TASKS):
        return None
    if value == GENERAL_EVAL and not Path(value).exists():
        return str(GENERAL_DIR / "eval.jsonl")
    return value


def general_eval_tasks(value: str | None) -> list[str]:
    """The lm-eval tasks ``--general-eval tasks:NAME[,NAME]`` names (names or local task YAML paths); [] otherwise."""
    if value is None or not value.startswith(GENERAL_EVAL_TASKS):
        return []
    names = [name.strip() for name in value[len(GENERAL_EVAL_TASKS):].split(",")]
    return list(dict.fromkeys(name for name in names if name))


__all__ = ["DataSource", "LoadedData", "parse_source", "parse_sources", "relative_weights", "mix_counts", "load_mixed",
           "general_eval_file", "general_eval_tasks", "GENERAL_DIR", "GENERAL_SOURCE", "GENERAL_EVAL",
           "GENERAL_EVAL_TASKS"]
