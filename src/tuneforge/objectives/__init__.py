"""Training objectives: WHAT is optimised. One file per objective; ``base.py`` holds the contract."""

from .base import Objective, TrainContext, available_objectives, get_objective

__all__ = ["Objective", "TrainContext", "available_objectives", "get_objective"]
