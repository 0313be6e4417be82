"""Progress for every wait longer than a few seconds: a tqdm bar on a terminal (as training shows), and where
stderr is not a terminal (a log file, CI, a pipe) one log line when the stage starts and one when it ends.

Only the main process of a torchrun job reports, so N ranks do not draw N bars."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterator

log = logging.getLogger("tuneforge")


class Progress:
    """``update(n)`` as work completes; ``desc=None`` reports nothing (an inner call of a reported stage)."""

    def __init__(self, desc: str | None, total: int, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.start = time.perf_counter()
        self.bar = None
        if desc is None or os.environ.get("RANK", "0") != "0":
            self.desc = None
        elif sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
        else:
            log.info("%s: %d %s(s)...", desc, total, unit)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.desc is not None:
            log.info("%s: %d %s(s) in %.1fs", self.desc, self.total, self.unit, time.perf_counter() - self.start)


@contextlib.contextmanager
def progress(desc: str | None, total: int, unit: str = "item") -> Iterator[Progress]:
    bar = Progress(desc, total, unit)
    try:
        yield bar
    finally:
        bar.close()


__all__ = ["Progress", "progress"]
