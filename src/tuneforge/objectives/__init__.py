"""Training objectives: WHAT is optimised. One file per objective; ``base.py`` holds the contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Objective", "TrainContext", "available_objectives", "get_objective"]


def __getattr__(name: str) -> Any:
    # base.py imports torch; `tuneforge --help` imports this package for the alignment subcommands' parsers
    # (commands/alignment.py), so the contract is loaded the first time one of its names is used.
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import base

    return getattr(base, name)


if TYPE_CHECKING:
    from .base import Objective, TrainContext, available_objectives, get_objective
