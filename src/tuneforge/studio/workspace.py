"""The studio's workspace: one folder that every path a browser names must lie in.

The studio serves whoever reaches its port (on 127.0.0.1 by default, behind a key when one is given). A path typed
into a form is resolved against the workspace root, symlinks followed, and refused when it ends outside: nothing is
read, listed or written there. Names that are not paths pass through unchanged: the bundled data sets (``demo``,
``general``), the embedded model names and hub ids, which the library resolves itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data.bundled import BUNDLED
from ..errors import ConfigError

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt")
STUDIO_DIR = ".tuneforge-studio"  # the studio's own records (job logs, queue) inside the workspace
SKIPPED_DIRS = {".git", "__pycache__", ".venv", "node_modules", STUDIO_DIR}


class Workspace:
    """Paths under ``root``; ``resolve`` is the one door from a typed path to the file system."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ConfigError(f"--workspace {root}: not a directory")

    def resolve(self, text: str | Path, what: str = "path") -> Path:
        """``text`` (relative to the root, or absolute) as an absolute path inside the workspace; ConfigError when
        it lies outside (``..``, an absolute path elsewhere, a symlink pointing out)."""
        raw = str(text).strip()
        if not raw:
            raise ConfigError(f"{what}: empty path")
        path = Path(os.path.expanduser(raw))
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        if not resolved.is_relative_to(self.root):
            raise ConfigError(f"{what} {raw}: outside the workspace {self.root}; the studio reads and writes only "
                              "under it (start it with --workspace to choose another)")
        return resolved

    def relative(self, path: Path) -> str:
        """How a path inside the workspace is shown and passed to commands (they run in the root)."""
        path = Path(path).resolve()
        return str(path.relative_to(self.root)) if path != self.root else "."

    def data_path(self, text: str, what: str = "data") -> str:
        """A data source as the command takes it: a bundled name as is, a file relative to the root (checked)."""
        name = str(text).strip()
        base = name.partition(":")[0]
        if base in BUNDLED and not (self.root / name).exists():
            return name
        return self.relative(self.resolve(name, what))

    def model_name(self, text: str) -> str:
        """A model: a local folder or file (checked, relative to the root), else an embedded name or hub id."""
        name = str(text).strip()
        looks_local = name.startswith((".", "/", "~")) or (self.root / name).exists() or os.path.isabs(name)
        return self.relative(self.resolve(name, "model")) if looks_local else name

    def data_files(self, limit: int = 500) -> list[str]:
        """Data files under the root (relative paths, sorted), for the pickers."""
        found = []
        for directory, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
            here = Path(directory)
            if (here / "metrics.jsonl").exists():  # a run folder: its logs are not training data
                dirs[:] = []
                continue
            found += [self.relative(here / f) for f in sorted(files) if f.lower().endswith(DATA_SUFFIXES)]
            if len(found) >= limit:
                break
        return found[:limit]

    def studio_dir(self) -> Path:
        path = self.root / STUDIO_DIR
        path.mkdir(exist_ok=True)
        return path
