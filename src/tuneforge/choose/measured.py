"""What finished runs measured on this machine: their peak memory and seconds per step, beside the setup they ran
(method, objective, micro-batch, length, gradient checkpointing, CPU or GPU).

``recommend`` reads these from the run folders a ``compare`` or a sweep left (``--runs``, default ``runs/``) and, for
each method, sets each run's measured numbers against what its memory and time model estimated for that same setup:
the ratio then scales the model's estimates for the user's setup, so the table speaks for this machine.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

SUMMARY_NAME = "summary.json"
CONFIG_NAME = "tuneforge.yaml"


@dataclass(frozen=True)
class MeasuredRun:
    folder: Path
    method: str
    objective: str
    gpu: bool
    batch_size: int
    micro_batch: int
    max_length: int
    gradient_checkpointing: bool
    peak_mb: float
    step_s: float | None


@dataclass(frozen=True)
class Calibration:
    """Measured over estimated, per method, for memory and for time, from ``runs`` runs."""

    memory: float
    time: float | None
    runs: int


def training_pace(metrics: Path) -> dict[str, float]:
    """``tokens_seen`` (every step's real training tokens, summed) and ``step_s`` (training seconds per optimiser
    step, evaluations excluded) from a run's metrics.jsonl; empty where the log skips steps (--log-every > 1)."""
    if not metrics.is_file():
        return {}
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            return {}  # a run killed mid-line: not a measurement to trust
    steps = [r for r in records if isinstance(r, dict) and r.get("step", 0) > 0 and "loss" in r]
    if not steps or [r["step"] for r in steps] != list(range(1, len(steps) + 1)):
        return {}
    tokens = sum(r.get("tokens", 0) for r in steps)
    out: dict[str, float] = {"tokens_seen": tokens}
    if tokens and steps[-1].get("tokens_per_s"):  # the run's running rate: its tokens over its training seconds
        out["step_s"] = round(tokens / steps[-1]["tokens_per_s"] / len(steps), 4)
    return out


def read_run(folder: Path) -> MeasuredRun | None:
    """The run in ``folder`` if it finished and recorded a peak; None otherwise."""
    try:
        config = yaml.safe_load((folder / CONFIG_NAME).read_text())
        summary = json.loads((folder / SUMMARY_NAME).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not isinstance(summary, dict) or "peak_memory_mb" not in summary:
        return None
    batch = int(config.get("batch_size", 8))
    micro = int(config.get("micro_batch_size") or batch)
    return MeasuredRun(folder, config.get("method", "lora"), config.get("objective", "sft"),
                       "peak_cuda_allocated_mb" in summary, batch, micro, int(config.get("max_length", 512)),
                       bool(config.get("gradient_checkpointing")), float(summary["peak_memory_mb"]),
                       training_pace(folder / "metrics.jsonl").get("step_s"))


def runs_of_model(root: Path, model_reference: str, model_of: Callable[[Any], str]) -> list[MeasuredRun]:
    """Every finished run under ``root`` (any depth) that trained ``model_reference``; ``model_of`` turns a run's
    recorded model into the same kind of reference."""
    found = []
    for config in sorted(Path(root).rglob(CONFIG_NAME)) if Path(root).is_dir() else []:
        try:
            recorded = (yaml.safe_load(config.read_text()) or {}).get("model")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if recorded is None or model_of(recorded) != model_reference:
            continue
        run = read_run(config.parent)
        if run is not None:
            found.append(run)
    return found


def calibrations(runs: list[MeasuredRun], gpu: bool, estimate_mb: Callable[[MeasuredRun], float],
                 estimate_s: Callable[[MeasuredRun], float]) -> dict[str, Calibration]:
    """Per method, the median ratio of measured to estimated peak and step time over its runs on this kind of
    device (a CPU's runs say nothing of a GPU's memory)."""
    by_method: dict[str, list[MeasuredRun]] = {}
    for run in runs:
        if run.gpu == gpu:
            by_method.setdefault(run.method, []).append(run)
    out = {}
    for method, mine in by_method.items():
        memory = statistics.median(r.peak_mb / estimate_mb(r) for r in mine)
        timed = [r.step_s / estimate_s(r) for r in mine if r.step_s]
        out[method] = Calibration(memory, statistics.median(timed) if timed else None, len(mine))
    return out
