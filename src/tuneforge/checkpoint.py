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
                        progress: dict[str, Any]) -> None:
    """Trainable tensors (safetensors) plus optimiser, scheduler, RNG and data position (torch file)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
    save_file(tensors, str(directory / "trainable.safetensors"), metadata={"format": "pt"})
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
         "progress": progress},
        directory / TRAINING_STATE,
    )
    (directory / "progress.json").write_text(json.dumps(progress, indent=2) + "\n")


def load_training_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    trainable = load_file(str(directory / "trainable.safetensors"))
    state = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=True)
    return trainable, state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit()
             and (p / TRAINING_STATE).is_file()]
    return max(steps)[1] if steps else None
