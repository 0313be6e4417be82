"""Errors a user can act on. The CLI prints their one-line message and exits 2; anything else is a bug and keeps
its traceback."""

from __future__ import annotations


class TuneforgeError(Exception):
    """Base of the errors that describe a problem with the user's input or run, not with tuneforge."""


class TrainingDiverged(TuneforgeError, RuntimeError):
    """The loss, a gradient or a trainable tensor became NaN or infinite; the last good checkpoint is kept."""


class RunInUse(TuneforgeError):
    """Another process is training into the same output directory."""


class ResumeMismatch(TuneforgeError, ValueError):
    """``--resume`` with settings that change what the checkpoint means (a different method, rank, data...)."""


class ConfigError(TuneforgeError, ValueError):
    """A run config, pipeline or flag that cannot mean anything; the message names the file and key."""
