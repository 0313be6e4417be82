"""Progress of a run that trains in another process: its ``metrics.jsonl`` read while it grows, one log line at a
time ("compare: [2/6] lora, seed 1: step 20/50 (40%), loss 0.4123, 1.9 s/step, about 57 s left").

compare runs each ``tuneforge train`` with its progress bar off (a bar drawn through a pipe is a wall of carriage
returns); this is what it shows instead, from the file the run writes anyway.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

EVERY_S = 10.0  # between two lines: often enough to see it move, rarely enough to read
TAIL_BYTES = 8192  # a metrics line is well under this


def last_step(metrics: Path) -> dict | None:
    """The newest step record in ``metrics`` (None before the first step, or while the file is being replaced)."""
    try:
        with metrics.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the tail or still being written
        if isinstance(record, dict) and record.get("step", 0) > 0 and "loss" in record:
            return record
    return None


def progress_line(label: str, step: int, total: int | None, loss: float | None, seconds_per_step: float | None) -> str:
    parts = [f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if seconds_per_step:
        parts.append(f"{seconds_per_step:.3g} s/step")
        if total and total > step:
            parts.append(f"about {_duration(seconds_per_step * (total - step))} left")
    return f"{label}: " + ", ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class Watcher:
    """``with Watcher(run_dir / "metrics.jsonl", label, total):`` logs the run's progress every ``every_s`` seconds
    while the block runs, and the last step seen when it ends."""

    def __init__(self, metrics: Path, label: str, total_steps: int | None, every_s: float = EVERY_S):
        self.metrics, self.label, self.total, self.every_s = Path(metrics), label, total_steps, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._first: tuple[int, float] | None = None  # (step, time) when a step was first seen: the rate's origin
        self.reported = 0

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.report()

    def report(self) -> str | None:
        """Log a line if the run has made a step since the last one; the line, or None."""
        record = last_step(self.metrics)
        if record is None or record["step"] <= self.reported:
            return None
        now = time.monotonic()
        if self._first is None:
            self._first = (record["step"], now)
        steps, seconds = record["step"] - self._first[0], now - self._first[1]
        rate = seconds / steps if steps > 0 else None
        line = progress_line(self.label, record["step"], self.total, record.get("loss"), rate)
        self.reported = record["step"]
        log.info("%s", line)
        return line
