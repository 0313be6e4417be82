"""Run folders as the studio lists them: found on disk each time (so a browser reload, a studio restart and a run
started from the command line all show the same list), with their state and their metrics for the charts.

A run's state comes from its own files: ``run.json`` says whether it finished; a run still training holds its
folder's lock, whose file names the pid. The studio's job records only add what the folder cannot know (queued
runs, the command, the log).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..run.checkpoint import LOCK_FILE, RUN_RECORD, read_run_record
from .jobs import alive
from .workspace import SKIPPED_DIRS, Workspace

RUN_CONFIG = "tuneforge.yaml"
METRICS = "metrics.jsonl"


@dataclasses.dataclass
class RunInfo:
    path: str  # relative to the workspace
    state: str  # finished | running | stopped (an unfinished run nobody trains)
    method: str = ""
    objective: str = ""
    model: str = ""
    step: int = 0
    max_steps: int | None = None
    loss: float | None = None

    @property
    def progress(self) -> str:
        return f"{self.step}/{self.max_steps}" if self.max_steps else str(self.step)


def is_run_folder(folder: Path) -> bool:
    return (folder / RUN_RECORD).is_file() or (folder / RUN_CONFIG).is_file() and (folder / METRICS).is_file()


def find_runs(workspace: Workspace, limit: int = 200) -> list[Path]:
    """Run folders under the workspace, newest first (a run folder's subfolders, its checkpoints, are not runs)."""
    found = []
    for directory, dirs, _ in os.walk(workspace.root):
        here = Path(directory)
        if is_run_folder(here):
            found.append(here)
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
    found.sort(key=lambda p: _mtime(p), reverse=True)
    return found[:limit]


def _mtime(folder: Path) -> float:
    files = [folder / METRICS, folder / RUN_RECORD, folder]
    return max(f.stat().st_mtime for f in files if f.exists())


def run_info(workspace: Workspace, folder: Path) -> RunInfo:
    config = read_config(folder)
    records = read_metrics(folder)
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    record = read_run_record(folder) or {}
    state = "finished" if record.get("finished") else "running" if training(folder) else "stopped"
    return RunInfo(workspace.relative(folder), state, str(config.get("method", "")), str(config.get("objective", "")),
                   str(config.get("model", "")), max((int(r.get("step", 0)) for r in records), default=0),
                   config.get("max_steps"), losses[-1] if losses else None)


def training(folder: Path) -> bool:
    """A process holds the run: its lock file names a live tuneforge pid (the lock outlives its holder's exit)."""
    lock = folder / LOCK_FILE
    try:
        words = lock.read_text().split()
    except OSError:
        return False
    return len(words) == 2 and words[0] == "pid" and words[1].isdigit() and alive(int(words[1]))


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((folder / RUN_CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl``'s records; a line being written (or cut by a kill) is skipped."""
    try:
        lines = (folder / METRICS).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def series(records: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Long-format points ``{step, value, series}`` of ``keys`` (for a line chart with one colour per series)."""
    return [{"step": int(r.get("step", 0)), "value": float(r[key]), "series": key} for r in records for key in keys
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
