"""Data sets that ship with tuneforge, addressable by name wherever a data file is taken.

``demo`` is the demonstration task (``demo`` or ``demo:train`` its training split, ``demo:eval`` its held-out
split); ``general`` is the general-text replay set (``general:eval`` its held-out split). A file or folder of the
same name in the working directory wins: names never hide the user's own files.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parents[1] / "assets"
BUNDLED = {"demo": ASSETS / "demo", "general": ASSETS / "general"}
SPLITS = ("train", "eval")


def bundled_file(name: str) -> Path | None:
    """The shipped file ``name`` stands for (``demo``, ``demo:eval`` ...), or None when it names no bundled set or a
    local path of that name exists."""
    if Path(name).exists():
        return None
    base, _, split = name.partition(":")
    if base not in BUNDLED or (split and split not in SPLITS):
        return None
    return BUNDLED[base] / f"{split or 'train'}.jsonl"


def held_out_name(name: str) -> str:
    """For commands that evaluate: a bare bundled name means its held-out split (``eval --data demo``)."""
    return f"{name}:eval" if name in BUNDLED and bundled_file(name) is not None else name


__all__ = ["BUNDLED", "bundled_file", "held_out_name"]
