"""Experiment trackers: every record the trainer writes to ``metrics.jsonl``, and the resolved config, also go to
TensorBoard, Weights & Biases, MLflow and/or Trackio (``--report-to tensorboard,wandb``), each through its own
library.

The libraries are optional (``pip install "tuneforge[track]"``) and imported only when a run asks for them; a
missing one, or W&B with no credentials, is reported when :class:`Tracking` is built, which
:func:`tuneforge.run.trainer.train` does before the model loads and the run directory is made. Where each tracker
writes, unless its own environment variables say otherwise:

- tensorboard: event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``);
- wandb: the run's files in ``RUN/wandb``; online when logged in, ``WANDB_MODE=offline`` keeps everything there
  (``wandb sync`` uploads it later); project ``WANDB_PROJECT`` or ``tuneforge``;
- mlflow: ``MLFLOW_TRACKING_URI`` if set, else a SQLite store in ``RUN/mlflow.db`` (MLflow's own default backend;
  its plain-file store is in maintenance mode): ``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``;
  experiment ``MLFLOW_EXPERIMENT_NAME`` or ``tuneforge``;
- trackio: trackio's local database (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``), project
  ``tuneforge``: ``trackio show --project tuneforge``.

Only the main process (rank 0) reports, so a job on eight GPUs is one run in each tracker, not eight.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import TuneforgeError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "tuneforge[track]"'
# Totals of the run that metrics.jsonl does not hold (they are known once, at the end): reported as a summary.
SUMMARY_KEYS = ("peak_memory_mb", "peak_rss_mb", "train_wall_s", "trainable_params", "total_params")


class TrackerNotInstalled(TuneforgeError, ImportError):
    """A tracker named in ``report_to`` whose library is not installed."""


class TrackerNotReady(TuneforgeError):
    """A tracker that could not open a run as it is set up (W&B with no credentials): said before training."""


class Tracker(abc.ABC):
    """One run in one tracker, opened by the constructor. ``module`` is the library that must be importable."""

    name: str
    module: str

    @classmethod  # noqa: B027 (most trackers need nothing checked: a default, not an abstract method)
    def check(cls) -> None:
        """Raise :class:`TrackerNotReady` if opening a run would fail; called before the run directory exists."""

    @abc.abstractmethod
    def __init__(self, output: Path, run_name: str, config: dict[str, Any]): ...

    @abc.abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def summary(self, metrics: dict[str, float], step: int) -> None:
        """Values known once per run; trackers without a summary of their own record them at the last step."""
        self.log(metrics, step)

    @abc.abstractmethod
    def close(self, failed: bool) -> None: ...


class TensorBoardTracker(Tracker):
    name, module = "tensorboard", "tensorboard"

    def __init__(self, output: Path, run_name: str, config: dict[str, Any]):
        import yaml
        from torch.utils.tensorboard import SummaryWriter  # PyTorch's writer; it needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"))
        # Indented four spaces, TensorBoard's Markdown shows the YAML as a code block.
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name, module = "wandb", "wandb"
    LOCAL_MODES = ("offline", "disabled", "dryrun")  # WANDB_MODE values that need no account

    @classmethod
    def check(cls) -> None:
        # With no credentials and no terminal, wandb.init raises a UsageError after the run folder is made; wandb's
        # own lookup (environment, settings, .netrc; no prompt, no network) tells first.
        if os.environ.get("WANDB_MODE", "").lower() in cls.LOCAL_MODES:
            return
        import wandb

        try:
            logged_in = wandb.login(verify=False, prompt=False)
        except wandb.Error as e:  # a malformed WANDB_API_KEY, say
            raise TrackerNotReady(f"report_to wandb: {e}") from None
        if not logged_in:
            raise TrackerNotReady("report_to wandb: no Weights & Biases credentials; log in with `wandb login` (or "
                                  "set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run in RUN/wandb "
                                  "(`wandb sync` uploads it later)")

    def __init__(self, output: Path, run_name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tuneforge"), name=run_name,
                              dir=str(output), config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        # Records of one step (the train step, then the final eval) merge into one row of the run's history.
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        self.run.summary.update(metrics)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflowTracker(Tracker):
    name, module = "mlflow", "mlflow"
    # MLflow caps one log_batch call at 1000 metrics and 100 params.
    PARAMS_PER_BATCH = 100

    def __init__(self, output: Path, run_name: str, config: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output.resolve() / 'mlflow.db'}"
        # A client bound to one URI, not mlflow's process-wide "active run": the user's own runs are left alone.
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tuneforge")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # Artifacts of a local store stay inside the run too (MLflow's default is ./mlruns of the cwd).
            local = None if os.environ.get("MLFLOW_TRACKING_URI") else (output.resolve() / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=local)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(key, str(value)) for key, value in flatten(config).items()]
        for start in range(0, len(params), self.PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + self.PARAMS_PER_BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TrackioTracker(Tracker):
    name, module = "trackio", "trackio"

    def __init__(self, output: Path, run_name: str, config: dict[str, Any]):
        import trackio

        # No dashboard embedded or launched: a training job only writes.
        self.run = trackio.init(project="tuneforge", name=run_name, config=config, embed=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        import trackio

        trackio.finish()  # the run trackio.init made current: finishing it through the module also clears that


TRACKERS: dict[str, type[Tracker]] = {cls.name: cls for cls in
                                      (TensorBoardTracker, WandbTracker, MLflowTracker, TrackioTracker)}


def tracker_names(value: str | Iterable[str] | None) -> list[str]:
    """``report_to`` as given (``"tensorboard,wandb"``, a list, ``"none"`` or None) → the tracker names, checked."""
    if value is None:
        return []
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"report_to: expected tracker names (tensorboard,wandb,...) or none, got {value!r}")
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = [str(p).strip().lower() for p in parts if p is not None and str(p).strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(TRACKERS)} (comma-separated), or none")
    return list(dict.fromkeys(names))  # "wandb,wandb" is one run


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys (``method_options.r``), for trackers whose params are flat."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, without its step (bools and strings are not metrics)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracking:
    """The trackers one run reports to. Built first (it checks the libraries), started once the run directory is
    ready, fed every metrics.jsonl record, closed at the end — as a context manager, also when the run fails."""

    def __init__(self, names: Iterable[str] = ()):
        from .distributed import is_main_process  # torch: imported when a run starts, not by `tuneforge report`

        self.classes = [TRACKERS[n] for n in tracker_names(list(names))] if is_main_process() else []
        missing = [cls.name for cls in self.classes if importlib.util.find_spec(cls.module) is None]
        if missing:
            raise TrackerNotInstalled(f"report_to: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                      f"not installed; {INSTALL_HINT} installs every tracker tuneforge reports to")
        with contextlib.redirect_stdout(sys.stderr):  # tuneforge's stdout carries only results
            for cls in self.classes:
                cls.check()
        self.active: list[Tracker] = []

    def start(self, output: str | Path, config: dict[str, Any]) -> None:
        output = Path(output)
        # Trackers print banners (trackio to stdout); tuneforge's stdout carries only results.
        with contextlib.redirect_stdout(sys.stderr):
            for cls in self.classes:
                self.active.append(cls(output, output.resolve().name, config))
                log.info("reporting to %s", cls.name)

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            for tracker in self.active:
                tracker.log(values, int(record.get("step", 0)))

    def summary(self, metrics: dict[str, Any], step: int) -> None:
        values = {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
        for tracker in self.active:
            tracker.summary(scalars(values), step)

    def close(self, failed: bool = False) -> None:
        errors = []
        with contextlib.redirect_stdout(sys.stderr):
            for tracker in self.active:
                try:
                    tracker.close(failed)
                except Exception as e:  # one tracker failing to close must not leave the others open
                    log.warning("closing %s failed: %s", tracker.name, e)
                    errors.append(e)
        self.active = []
        if errors and not failed:
            raise errors[0]

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
