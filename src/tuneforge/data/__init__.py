"""Records in, batches out."""

from .formats import DataError, Example, load_examples

__all__ = ["DataError", "Example", "load_examples"]
