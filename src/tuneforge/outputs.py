"""Where a command may write: one rule for every command that writes (train, merge, export, convert, compare,
pipelines, synth, report, generate).

1. An output is never one of the command's inputs, inside one, or a folder that holds one: writing there would
   replace (or, with ``--overwrite``, delete) what the command reads. ``--overwrite`` does not lift this.
2. An existing non-empty target is refused unless the user passed ``--overwrite``.
3. Outputs are written to a staging path beside the target and renamed into place, so a failed or killed command
   leaves the old target as it was and no half-written file; the staging path is removed on failure.

The errors are ``OutputConflict`` (a ``TuneforgeError``): the CLI prints their one line and exits 2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from .errors import TuneforgeError


class OutputConflict(TuneforgeError, FileExistsError):
    """The output would replace an input or something the user did not ask to replace."""


def _local(path: str | Path | None) -> Path | None:
    """``path`` resolved, when it names something on this machine (a hub id or a built-in name does not)."""
    if path is None or str(path) == "":
        return None
    candidate = Path(path).expanduser()
    return candidate.resolve() if candidate.exists() else None


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_input(target: str | Path, inputs: Iterable[str | Path | None], flag: str = "--output",
                    allow_inside: bool = False) -> Path:
    """Refuse a ``target`` that is an input, lies inside one, or contains one. Returns ``target`` resolved.

    ``allow_inside``: an output folder inside an input folder is fine (a run's ``report/``, derived from the run and
    replaced with it); the target itself still may not be an input nor hold one."""
    resolved = Path(target).expanduser().resolve()
    for source in inputs:
        local = _local(source)
        if local is None:
            continue
        if allow_inside and resolved != local and _is_within(resolved, local):
            continue
        if _is_within(resolved, local):
            where = "is" if resolved == local else "lies inside"
            raise OutputConflict(f"{flag} {target} {where} the input {source}: writing there would replace what "
                                 "this command reads; choose another output")
        if _is_within(local, resolved):
            raise OutputConflict(f"{flag} {target} contains the input {source}: writing there would replace what "
                                 "this command reads; choose another output")
    return resolved


def is_nonempty(path: Path) -> bool:
    """A file, or a directory with anything in it."""
    if path.is_dir():
        return any(path.iterdir())
    return path.exists()


def check_output(target: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                 kind: str = "dir", flag: str = "--output") -> Path:
    """Apply the rule to ``target`` before any work is done; returns it as a ``Path``.

    ``kind`` is ``"dir"`` (a folder the command fills) or ``"file"`` (one file it writes). A file target that is an
    existing folder, or a folder target that is an existing file, is refused whatever ``overwrite`` says.
    """
    check_not_input(target, inputs, flag)
    path = Path(target)
    if kind == "file" and path.is_dir():
        raise OutputConflict(f"{flag} {target} is a directory; give a file name (e.g. {path / 'model.gguf'})")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise OutputConflict(f"{flag} {target} is a file; give a directory")
    if is_nonempty(path) and not overwrite:
        what = "exists" if kind == "file" else "exists and is not empty"
        raise OutputConflict(f"{flag} {target} {what}; pass --overwrite to replace it, or choose another output")
    return path


def _staging_name(target: Path, tag: str) -> Path:
    # Beside the target (same file system, so the final rename is atomic), hidden, and unique per attempt.
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def staged_file(target: str | Path) -> Iterator[Path]:
    """A temporary path to write ``target``'s content to; renamed over ``target`` only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_name(target, "tmp")
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """A fresh temporary folder to fill; on success it replaces ``target`` whole (what was there is removed, not
    mixed with the new files). On failure the folder is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_name(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target``, replacing whatever ``target`` was; ``target`` is never missing
    its old content unless the new content is in place (old moved aside, new renamed in, old removed)."""
    old = None
    if target.exists() or target.is_symlink():
        old = _staging_name(target, "old")
        target.rename(old)
    try:
        source.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


__all__ = ["OutputConflict", "check_not_input", "check_output", "is_nonempty", "replace_dir", "staged_dir",
           "staged_file"]
