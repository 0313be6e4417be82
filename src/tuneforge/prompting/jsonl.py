"""An append-only JSONL file that survives crashes: every line is flushed and fsynced before the next.

A process killed mid-write leaves at most one unterminated last line; :meth:`JsonlLog.open` cuts it off
(with a warning) so the file is valid again. A corrupt line that *is* terminated is not a crash artefact,
so it is an error naming the line, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


class JsonlLog:
    """Append JSON objects to ``path`` durably; ``records`` holds what the file held when opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self.repaired_bytes = 0  # size of the torn tail that was cut off, 0 when the file was intact
        self._file: IO[str] | None = None

    def open(self) -> "JsonlLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._load_and_repair()
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def append(self, record: dict[str, Any]) -> None:
        assert self._file is not None, "call open() first"
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "JsonlLog":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _load_and_repair(self) -> None:
        data = self.path.read_bytes()
        good_end = 0  # byte offset just past the last intact line
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            terminated = line.endswith(b"\n")
            record = _parse(line)
            if record is None and not terminated:
                break  # the torn tail of an interrupted write
            if record is None:
                if line.strip():
                    raise ValueError(f"{self.path}:{number}: corrupt JSONL line (not a crash artefact: it is "
                                     f"newline-terminated); fix or remove it")
            else:
                self.records.append(record)
            good_end += len(line)
        if good_end < len(data):
            self._truncate(good_end, len(data) - good_end)
        elif data and not data.endswith(b"\n"):
            with self.path.open("ab") as f:  # a complete last record whose newline was lost
                f.write(b"\n")

    def _truncate(self, good_end: int, torn: int) -> None:
        log.warning("%s: cut off a half-written last line (%d bytes) left by an interrupted run", self.path, torn)
        with self.path.open("r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
        self.repaired_bytes = torn


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
