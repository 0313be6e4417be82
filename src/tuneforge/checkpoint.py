"""Training state on disk: atomic checkpoint directories, RNG state, and resumable optimiser/scheduler state.

Every directory is written under a temporary name and renamed into place, so a run killed at any moment leaves
either the previous checkpoint or the new one, never half of one. Trainable tensors are safetensors; the training
state (optimiser, scheduler, RNG) is a torch file loaded with ``weights_only=True`` (no arbitrary unpickling).
Adapter files (``adapter_config.json`` + ``adapter_model.safetensors``) are ``tuneforge.methods.adapter_files``'s.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAINING_STATE = "training_state.pt"


class atomic_directory:
    """``with atomic_directory(path) as tmp:`` write into ``tmp``; it replaces ``path`` only on success."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.path.with_name(f".{self.path.name}.old{os.getpid()}")
        if self.path.exists():
            self.path.rename(old)
        self.tmp.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key array travels as a tensor so the state file loads with weights_only=True.
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(directory: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                        progress: dict[str, Any], rng: dict[str, Any] | None = None) -> None:
    """Trainable tensors (safetensors) plus optimiser, scheduler, RNG and data position (torch file). ``rng``:
    what to store as the RNG state (a distributed run's per-rank states); default this process's."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
    save_file(tensors, str(directory / "trainable.safetensors"), metadata={"format": "pt"})
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng or rng_state(),
         "progress": progress},
        directory / TRAINING_STATE,
    )
    (directory / "progress.json").write_text(json.dumps(progress, indent=2) + "\n")


def load_training_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    trainable = load_file(str(directory / "trainable.safetensors"))
    state = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=True)
    return trainable, state


def checkpoints_newest_first(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their training state was written: the directory was renamed into place), newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit()
             and (p / TRAINING_STATE).is_file()]
    return [p for _, p in sorted(steps, reverse=True)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints_newest_first(run_dir)
    return found[0] if found else None


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete what a killed process leaves behind: half-written ``.NAME.tmpPID`` directories and ``.NAME.oldPID``
    ones a rename did not finish removing, in the run directory and its checkpoints. Returns what was removed."""
    removed = []
    for root in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not root.is_dir():
            continue
        for path in root.iterdir():
            if path.name.startswith(".") and (".tmp" in path.name or ".old" in path.name):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def publish(staging: Path, directory: Path) -> None:
    """Move every entry of ``staging`` into ``directory`` (each by an atomic rename), then remove ``staging``.

    A run's final files are written into a staging directory first, so a kill during the write leaves the previous
    files (or none) and a staging directory that ``remove_leftovers`` deletes, never a half-written weight file."""
    for entry in sorted(staging.iterdir()):
        target = directory / entry.name
        if entry.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


# -- who owns a run directory, and whether its run finished ---------------------------------------------------

RUN_RECORD = "run.json"
LOCK_FILE = ".lock"


class OutputLock:
    """An exclusive lock on a run directory while a run trains into it: a second run is refused instead of
    interleaving its metrics and checkpoints with the first. The lock is the kernel's (``flock``), so a run killed
    by any means releases it; nothing stale is left to clean up."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.file = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        from .errors import RunInUse

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunInUse(f"{self.path.parent} is in use by a running training run ({holder}); wait for it, or "
                           "choose another --output") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def read_run_record(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # cut short by a kill: the run did not finish


def write_run_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    """``run.json`` (run id, whether the run finished), replaced atomically."""
    path = Path(run_dir) / RUN_RECORD
    tmp = path.with_name(f".{RUN_RECORD}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
