"""A run's folder: its lock, ``run.json``, ``metrics.jsonl``, checkpoints (write, rotate, resume) and the staged final
save. The trainer trains; this module is everything it leaves on disk and reads back.

    runs/x/
      .tuneforge.lock          held while a process runs in the folder (a second run into it is refused)
      run.json                 run id, finished flag, the "before" numbers (baseline), precision of the base
      tuneforge.yaml           the resolved config (a local base by absolute path)
      metrics.jsonl            one record per logged step (a resumed run drops what it does again)
      checkpoints/step-N/      trainable tensors, optimiser, scheduler, RNG, data position; written atomically
      adapter_model.safetensors ... the result, staged and moved into place, then run.json says finished

Rank 0 owns the folder under torchrun; the other ranks wait for it (:meth:`Distributed.on_main`) and stop with its
error. Under FSDP every rank writes its own shards of a checkpoint, which rank 0 publishes once all succeeded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from ..config import RunConfig, save_config
from ..data.mixing import general_eval_file, general_eval_tasks, parse_sources
from ..errors import ResumeMismatch, TrainingDiverged, TuneforgeError
from ..inference.benchmarks import local_task_paths
from ..methods.adapter_files import nonfinite_tensors
from ..methods.base import MethodHandle
from ..objectives import Objective
from ..outputs import OutputConflict, check_not_input
from . import checkpoint as ckpt
from .distributed import Distributed, full_state_dict, plain_state_dict
from .tracking import Tracking

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"  # the final metrics: `tuneforge compare` and `report` read them

# Settings --resume may change: where and how often things are written, evaluated and shown.
RESUMABLE_CHANGES = {"output", "resume", "overwrite", "progress", "device", "trust_remote_code", "eval_every",
                     "general_eval", "general_eval_limit",
                     "eval_before", "eval_generate", "eval_max_new_tokens", "eval_limit", "log_every", "save_every",
                     "keep_checkpoints", "report_to", "distributed", "fsdp_cpu_offload",
                     # memory for time: the same arithmetic
                     "gradient_checkpointing", "checkpoint_every", "offload_activations", "compile",
                     "tiled_mlp"}


class DataPosition(Protocol):
    """Where training is in its data (an epoch sampler or a stream): saved in a checkpoint, restored on resume."""

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingState:
    """What a checkpoint holds and a resume restores: the trainer's live objects, by reference."""

    model: nn.Module
    handle: MethodHandle
    objective: Objective
    trainable: Callable[[], list[tuple[str, nn.Parameter]]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors and the method's and objective's own state."""
        return {**{n: p.detach() for n, p in self.trainable()}, **self.extra_tensors()}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Method and objective state that is not a parameter (AdaLoRA's importance averages), whole: a sharded
        tensor among it is gathered (a collective under FSDP)."""
        from torch.distributed.tensor import DTensor

        state = {f"method_state.{k}": v for k, v in self.handle.training_state().items()}
        state.update({f"objective_state.{k}": v for k, v in self.objective.training_state().items()})
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


class RunDirectory:
    def __init__(self, config: RunConfig, dist: Distributed, tracking: Tracking, model_reference: str):
        self.config = config
        self.path = Path(config.output)
        self.dist = dist
        self.tracking = tracking
        self.model_reference = model_reference  # the base as recorded: a local one by absolute path
        self._lock_depth = 0
        self.record: dict[str, Any] = {}
        # The "before" numbers (eval loss, exact match, general perplexity of the untouched model). Kept in run.json
        # as soon as they are measured, so a resumed run, which cannot measure them again, still reports its gain.
        self.baseline: dict[str, Any] = {}

    # -- the folder -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this run (re-entrant within it): a second run into it is refused."""
        owner = self.dist.is_main  # one lock per run: rank 0 holds it for every rank
        if self._lock_depth == 0 and owner:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = ckpt.OutputLock(self.path).__enter__()
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and owner:
                self._lock.__exit__(None, None, None)

    def prepare(self, precision: dict[str, str]) -> None:
        """Refuse to clobber a finished or resumable run; clear what a killed process left; record this run."""
        c, record = self.config, ckpt.read_run_record(self.path)
        refuse_foreign_output(c)  # checked before the lock too; here again, now that this process owns the folder
        if record is not None:
            finished = bool(record.get("finished"))
        else:  # a run from before run.json existed
            finished = (self.path / "tuneforge.yaml").exists() and (
                (self.path / "adapter_model.safetensors").exists() or (self.path / "config.json").exists())
        if finished and not (c.resume or c.overwrite):
            raise FileExistsError(f"{self.path} already holds a finished run; pass --overwrite or a new --output")
        resumable = ckpt.latest_checkpoint(self.path)
        if resumable is not None and not (c.resume or c.overwrite or finished):
            raise FileExistsError(f"{self.path} holds an unfinished run with a checkpoint ({resumable.name}); "
                                  "pass --resume to continue it, or --overwrite to start over")
        ckpt.remove_leftovers(self.path)
        if not c.resume or record is None:
            # A new run owns the directory: the previous run's files (checkpoints, log, a full model's weights beside
            # a new adapter) would otherwise mix with its own, or be resumed as if they were this run's.
            _empty_run_directory(self.path)
            record = {"run_id": uuid.uuid4().hex, "finished": False}
        else:  # resuming: what the interrupted run measured before its first step is still the baseline
            self.baseline = {**record.get("baseline", {}), **self.baseline}
        self.record = {**record, "finished": False, "baseline": self.baseline, "precision": precision}
        ckpt.write_run_record(self.path, self.record)
        # A local base is recorded by absolute path: `generate --adapter` from another folder must find the same
        # model, not take "mdl/tiny" for a hub id.
        save_config(c.model_copy(update={"model": self.model_reference}), self.path / "tuneforge.yaml")

    def kept_baseline(self) -> dict[str, Any]:
        """The "before" numbers a resumed run's predecessor measured (run.json), read before this run prepares."""
        return (ckpt.read_run_record(self.path) or {}).get("baseline", {}) if self.config.resume else {}

    def keep_baseline(self, numbers: dict[str, Any]) -> None:
        """Record "before" numbers; once the run directory is prepared they are written to run.json at once."""
        self.baseline.update(numbers)
        if self.dist.is_main and self.record:
            self.record["baseline"] = self.baseline
            ckpt.write_run_record(self.path, self.record)

    # -- metrics.jsonl --------------------------------------------------------------------------------------------
    def start_log(self, resumed_at: int) -> None:
        """A new run starts an empty log; a resumed one drops the steps it will do again."""
        if not self.dist.is_main:
            return
        if resumed_at == 0:
            (self.path / METRICS_NAME).unlink(missing_ok=True)
        else:
            self._drop_log_after(resumed_at)

    def _drop_log_after(self, step: int) -> None:
        # A run killed after its last checkpoint logged steps the resumed run does again: keep one record per step
        # (and drop a line the kill cut short).
        path = self.path / METRICS_NAME
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except json.JSONDecodeError:
                pass
        path.write_text("".join(kept))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.dist.is_main:  # every rank holds the reduced values; one writes them
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
        with open(self.path / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracking.log(record)  # the trackers get exactly the values the file has

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def kept(self) -> str:
        """For an error that stops training: what the user still has."""
        last = ckpt.latest_checkpoint(self.path)
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    def resume_signature(self) -> dict[str, Any]:
        """The settings a checkpoint's tensors and schedule depend on; ``--resume`` must not change them."""
        return self.config.model_dump(mode="json", exclude=RESUMABLE_CHANGES)

    def save_checkpoint(self, state: TrainingState, step: int, position: DataPosition) -> Path:
        path = self.path / "checkpoints" / f"step-{step}"
        # DDP replicas hold identical tensors: rank 0 writes them, with every rank's RNG (dropout differs per rank).
        rngs = self.dist.gather(ckpt.rng_state())
        rng = rngs[0] if len(rngs) == 1 else {"ranks": rngs}
        if self.dist.shards:
            self._write_sharded_checkpoint(state, path, step, position, rng)
        else:
            self.dist.on_main(self._write_checkpoint, state, path, step, position, rng)
        return path

    def _write_sharded_checkpoint(self, state: TrainingState, path: Path, step: int, position: DataPosition,
                                  rng: dict[str, Any]) -> None:
        """FSDP: every rank writes its shards (DCP) into one temporary directory, rank 0 adds the training state and
        renames the directory into place only after every rank's write succeeded."""
        d = self.dist
        d.reshard(state.model)  # an --eval-every pass just before may have left the root unsharded
        shards = ckpt.sharded_state(state.model, state.objective.extra_parameters(), state.optimizer)
        d.agreed(check_finite, ckpt.local_shards(shards["model"]), f"step {step}: trainable tensors", self.kept())
        extra = state.extra_tensors()
        target = ckpt.atomic_directory(path, tag=d.gather(os.getpid())[0])
        d.on_main(target.__enter__)
        try:
            ckpt.save_sharded(target.tmp, shards)
            d.on_main(self._write_training_state, target.tmp, extra, None, state.scheduler, step, position, rng)
        except BaseException as e:
            if d.is_main:
                target.__exit__(type(e), e, None)  # removes the temporary directory
            raise
        d.on_main(self._publish_sharded, target)

    def _publish_sharded(self, target: ckpt.atomic_directory) -> None:
        target.__exit__(None, None, None)  # every rank wrote: rename into place
        self._rotate_checkpoints()

    def _write_checkpoint(self, state: TrainingState, path: Path, step: int, position: DataPosition,
                          rng: dict[str, Any]) -> None:
        with ckpt.atomic_directory(path) as tmp:
            self._write_training_state(tmp, state.tensors(), state.optimizer, state.scheduler, step, position, rng)
        self._rotate_checkpoints()

    def _write_training_state(self, directory: Path, tensors: dict[str, torch.Tensor], optimizer, scheduler,
                              step: int, position: DataPosition, rng: dict[str, Any]) -> None:
        check_finite(tensors, f"step {step}: trainable tensors", self.kept())  # a NaN is never a "good" checkpoint
        progress = {"step": step, **position.state(), "run_id": self.record["run_id"],
                    "signature": self.resume_signature()}
        ckpt.save_training_state(directory, tensors, optimizer, scheduler, progress, rng=rng)

    def _rotate_checkpoints(self) -> None:
        root = self.path / "checkpoints"
        kept = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name[5:].isdigit())
        for _, old in kept[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    # -- resume ---------------------------------------------------------------------------------------------------
    def resume(self, state: TrainingState, position: DataPosition) -> int:
        """Continue from the newest checkpoint that reads back whole (a corrupt one falls back to the one before).
        Returns the step to continue from (0: none usable)."""
        partly_read = False
        for path in ckpt.checkpoints_newest_first(self.path):
            try:  # agreed: every rank moves on to the same checkpoint (the sharded read below is a collective)
                tensors, saved = self.dist.agreed(_read_checkpoint, path)
            except Exception as e:  # safetensors, torch and JSON each raise their own type for a damaged file
                log.warning("--resume: %s is unreadable (%s); trying the checkpoint before it", path, e)
                continue
            self._check_resume_settings(path, saved["progress"])
            if ckpt.is_sharded(path):
                try:  # DCP raises on every rank when one rank's read fails
                    ckpt.load_sharded(path, state.model, state.objective.extra_parameters(), state.optimizer)
                except Exception as e:
                    log.warning("--resume: %s is unreadable (%s); trying the checkpoint before it", path, e)
                    partly_read = True
                    continue
            return self._restore(state, path, tensors, saved, position)
        if partly_read:  # DCP reads in place: the weights and optimiser state are no longer the starting ones
            raise TuneforgeError(f"--resume: no checkpoint in {self.path} reads back whole; start over with "
                                 "--overwrite")
        log.warning("--resume: no usable checkpoint in %s; starting from scratch", self.path)
        return 0

    def _check_resume_settings(self, path: Path, progress: dict[str, Any]) -> None:
        if self.dist.shards and not ckpt.is_sharded(path):
            raise ResumeMismatch(f"--resume: {path} holds whole tensors (a DDP or single-process run's); resume it "
                                 "with --distributed ddp")
        saved, now = progress.get("signature"), self.resume_signature()
        if saved is None:  # a checkpoint from before signatures were recorded
            return
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            raise ResumeMismatch(f"--resume: {path} was written with different settings ({', '.join(changed)}); "
                                 "resume with the run's own settings, or start a new run with --overwrite")

    def _restore(self, state: TrainingState, path: Path, tensors: dict[str, torch.Tensor], saved: dict[str, Any],
                 position: DataPosition) -> int:
        if not ckpt.is_sharded(path):  # a sharded checkpoint's tensors and optimiser state are restored already
            with torch.no_grad():
                for name, p in state.trainable():
                    if name not in tensors:
                        raise KeyError(f"{path}: checkpoint lacks trainable tensor {name!r} (different method/config?)")
                    p.copy_(tensors[name])
            state.optimizer.load_state_dict(saved["optimizer"])
        state.handle.load_training_state(_with_prefix(tensors, "method_state."))
        state.objective.load_training_state(_with_prefix(tensors, "objective_state."))
        state.scheduler.load_state_dict(saved["scheduler"])
        ckpt.set_rng_state(self._own_rng(saved["rng"]))
        progress = saved["progress"]
        position.restore(progress)
        log.info("resumed from %s (step %d)", path, progress["step"])
        return int(progress["step"])

    def _own_rng(self, rng: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG state from a checkpoint (a distributed one holds one state per rank)."""
        if "ranks" not in rng:
            return rng
        if len(rng["ranks"]) != self.dist.world_size:
            log.warning("--resume: the checkpoint was written by %d ranks, this run has %d; random streams "
                        "(dropout) continue from rank 0's", len(rng["ranks"]), self.dist.world_size)
            return rng["ranks"][0]
        return rng["ranks"][self.dist.rank]

    def write_summary(self, metrics: dict[str, Any]) -> Path:
        """The run's final metrics as one JSON file (``tuneforge compare`` reads it; so can any script)."""
        path = self.path / SUMMARY_NAME
        ckpt.write_text_atomic(path, json.dumps(metrics, indent=1, default=str))
        return path

    # -- the result -----------------------------------------------------------------------------------------------
    def save_final(self, state: TrainingState, write: Callable[[Path], None]) -> None:
        """Write the result (``write(staging_folder)``) into a staging directory, move it into place, then mark the
        run finished: a kill at any moment leaves either no result or a whole one, never a truncated weight file that
        looks finished.

        Rank 0 writes; under FSDP every rank first joins the all-gather of the full weights, which rank 0 then saves
        through the method's own code, so the files are those a single process writes."""
        if not self.dist.shards:
            self.dist.on_main(self._write_final, state.tensors(), write)
            return
        full = full_state_dict(state.model)
        final = {n: full[n] for n, _ in state.handle.trainable_parameters()} if self.dist.is_main else {}
        with plain_state_dict(state.model, full):
            self.dist.on_main(self._write_final, final, write)

    def _write_final(self, tensors: dict[str, torch.Tensor], write: Callable[[Path], None]) -> None:
        check_finite(tensors, "final weights", self.kept())
        staging = self.path / f".final.tmp{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write(staging)
        ckpt.publish(staging, self.path)
        self.record["finished"] = True
        ckpt.write_run_record(self.path, self.record)


def check_run_output(config: RunConfig) -> None:
    """Before anything loads: the run's output is none of its inputs (the base model, the data), nor inside one,
    nor a folder that holds one. Not even --overwrite lifts this: `--output` = the base model would replace it."""
    inputs: list[str | None] = [config.model, config.eval_data, general_eval_file(config.general_eval),
                                *local_task_paths(general_eval_tasks(config.general_eval))]
    inputs += [source.path for source in parse_sources(config.data)]
    check_not_input(config.output, inputs)
    refuse_foreign_output(config)


def refuse_foreign_output(config: RunConfig) -> None:
    """A folder with someone else's files is replaced by a new run only with --overwrite, and never resumed into (a run
    of ours is checked later, in ``RunDirectory.prepare``, which knows finished from resumable)."""
    output = Path(config.output)
    if not config.overwrite and ckpt.read_run_record(output) is None and _holds_foreign_files(output):
        raise OutputConflict(f"--output {output} exists and is not empty (and holds no tuneforge run); pass "
                             "--overwrite to replace it, or choose another output")


def _holds_foreign_files(directory: Path) -> bool:
    """Whether ``directory`` holds files that are not a tuneforge run's (a model, a dataset, anything of the user's)."""
    if not directory.is_dir() or (directory / "tuneforge.yaml").exists():  # a run from before run.json existed
        return False
    return any(entry.name != ckpt.LOCK_FILE and not ckpt.is_leftover(entry) for entry in directory.iterdir())


def _empty_run_directory(directory: Path) -> None:
    """Remove everything in the run directory but the lock this process holds on it."""
    for entry in directory.iterdir():
        if entry.name == ckpt.LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_finite(tensors: dict[str, torch.Tensor], what: str, kept: str) -> None:
    bad = list(nonfinite_tensors(tensors))
    if bad:
        raise TrainingDiverged(f"{what}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:3])})"
                               + (f"; {kept}" if kept else ""))


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, saved = ckpt.load_training_state(path)
    check_finite(tensors, str(path), "")
    return tensors, saved


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
