"""Training state on disk: atomic checkpoint directories, RNG state, and resumable optimiser/scheduler state.

Every directory is written under a temporary name and renamed into place, so a run killed at any moment leaves
either the previous checkpoint or the new one, never half of one. Trainable tensors are safetensors; the training
state (optimiser, scheduler, RNG) is a torch file loaded with ``weights_only=True`` (no arbitrary unpickling).
Adapter files (``adapter_config.json`` + ``adapter_model.safetensors``) are ``tuneforge.methods.adapter_files``'s.

An FSDP run's checkpoint keeps its trainable tensors and optimiser state sharded: ``sharded/`` is a
``torch.distributed.checkpoint`` (DCP) directory, one file per rank plus metadata, keyed by parameter name, so it reads
back into any layout (the same world size, another one, or one process). The rest (scheduler, per-rank RNG, data
position, method/objective state) is the same ``training_state.pt`` rank 0 writes for any run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

# torch and safetensors are imported by the functions that use them: `tuneforge compare`, `report` and the CLI read
# run.json and checkpoint names through this module, and must start without loading torch.
if TYPE_CHECKING:
    import torch
    from torch import nn

TRAINING_STATE = "training_state.pt"


class atomic_directory:
    """``with atomic_directory(path) as tmp:`` write into ``tmp``; it replaces ``path`` only on success."""

    def __init__(self, path: str | Path, tag: int | None = None):
        self.path = Path(path)
        # ``tag``: the ranks of a distributed run write into one temporary directory, named by rank 0's pid.
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid() if tag is None else tag}")

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
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key array travels as a tensor so the state file loads with weights_only=True.
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

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
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
    save_file(tensors, str(directory / "trainable.safetensors"), metadata={"format": "pt"})
    torch.save(  # optimizer None: a sharded checkpoint, whose optimiser state is in sharded/
        {"optimizer": None if optimizer is None else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "rng": rng or rng_state(), "progress": progress},
        directory / TRAINING_STATE,
    )
    (directory / "progress.json").write_text(json.dumps(progress, indent=2) + "\n")


def load_training_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    trainable = load_file(str(directory / "trainable.safetensors"))
    state = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=True)
    return trainable, state


SHARDED = "sharded"


def is_sharded(directory: Path) -> bool:
    return (directory / SHARDED).is_dir()


def sharded_state(model: nn.Module, extra: list[tuple[str, nn.Parameter]], optimizer) -> dict[str, Any]:
    """The trainable tensors of ``model`` (this rank's shards under FSDP, whole tensors otherwise) and of ``extra``
    (an objective's heads outside the model), with the optimiser state, keyed by parameter name: what DCP saves."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(_with_heads(model, extra), optimizer,
                                              options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(directory: Path, state: dict[str, Any]) -> None:
    """Every rank writes its shards of ``state`` into ``directory/sharded``. A collective: it raises on every rank
    when one rank fails to write."""
    import torch.distributed.checkpoint as dcp

    with _plain_errors(directory / SHARDED, "could not be written"):
        dcp.save(state, checkpoint_id=directory / SHARDED)


def load_sharded(directory: Path, model: nn.Module, extra: list[tuple[str, nn.Parameter]], optimizer) -> None:
    """Restore ``sharded_state`` from ``directory/sharded``, resharded to this run's layout. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = sharded_state(model, extra, optimizer)  # the layout to read into (a fresh optimiser's state is created)
    with warnings.catch_warnings(), _plain_errors(directory / SHARDED, "does not read back"):
        # One process reading a sharded checkpoint (an FSDP run resumed on one rank) is intended.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=directory / SHARDED)  # a name the checkpoint lacks raises here
    # strict=False: the frozen base weights are not in a checkpoint, by design.
    set_state_dict(_with_heads(model, extra), optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


@contextlib.contextmanager
def _plain_errors(where: Path, what: str) -> Iterator[None]:
    """DCP's CheckpointException derives from BaseException: turn it into an ordinary error naming each failed rank,
    so that a damaged checkpoint falls back to the one before it and the CLI reports it in one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        causes = "; ".join(f"rank {rank}: {type(error).__name__}: {error}"
                           for rank, (error, _) in sorted(e.failures.items()))
        raise OSError(f"{where} {what} ({causes})") from None


def local_shards(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of each tensor (a DTensor's local shard), e.g. to check it for NaN without communicating."""
    from torch.distributed.tensor import DTensor

    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


def _with_heads(model: nn.Module, extra: list[tuple[str, nn.Parameter]]) -> nn.Module:
    """``model`` and the ``extra`` parameters under one root: torch's state-dict helpers name every optimiser parameter
    through a module, and an objective's reward / value head is not inside the model."""
    from torch import nn

    root, heads = nn.Module(), nn.Module()
    root.add_module("model", model)
    root.add_module("objective", heads)
    for name, param in extra:
        *path, leaf = name.split(".")
        owner = heads
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, param)
    return root


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
            if is_leftover(path):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def is_leftover(path: Path) -> bool:
    """A ``.NAME.tmp…`` / ``.NAME.old…`` entry: a write or a rename a killed process did not finish."""
    return path.name.startswith(".") and (".tmp" in path.name or ".old" in path.name)


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

        from ..errors import RunInUse

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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a reader (or a kill) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_run_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    """``run.json`` (run id, whether the run finished), replaced atomically."""
    write_text_atomic(Path(run_dir) / RUN_RECORD, json.dumps(record, indent=2) + "\n")
