"""torchrun setup, DDP / FSDP2 wrapping, rank-aware I/O. The trainer asks this module; it asks nothing of tuneforge's.

A run started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` ...) joins the
process group here: NCCL when the run's device is CUDA (one GPU per local rank), gloo on CPU. A run started any other
way is a world of one, and every helper below is then a no-op, so the trainer has one code path.

Semantics the trainer builds on:

- ``batch_size`` is the global batch. Every rank draws the same global batch (same seed, same order) and keeps its
  own contiguous slice (:meth:`Distributed.shard`): no example is seen twice or skipped, and the slices of one
  global batch are the micro-batches a single process with ``micro_batch_size = batch_size / world`` would run.
- DDP and FSDP2 average gradients over ranks; the trainer divides each rank's summed loss by the units of the whole
  global batch and multiplies by the world size, so the average is the single-process gradient.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import logging
import math
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")
# How long a collective may wait for a rank before it fails with an error instead of hanging forever (a rank that
# died without torchrun noticing, a deadlock). torchrun itself stops every rank as soon as one exits with an error.
DEFAULT_TIMEOUT_S = int(os.environ.get("TUNEFORGE_DIST_TIMEOUT", "1800"))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """True in a single process and on global rank 0 (before the process group exists too: torchrun's RANK)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


class RankFailed(RuntimeError):
    """Another rank raised: this rank stops too, naming it and its error."""


class Distributed:
    """The process group of this run (or a world of one) and the collectives the trainer needs."""

    def __init__(self, strategy: str = "ddp", device: torch.device | None = None, rank: int = 0,
                 world_size: int = 1, local_rank: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"distributed strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.strategy, self.device = strategy, device
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @classmethod
    def from_env(cls, strategy: str, device: str | None = None,
                 timeout_s: int = DEFAULT_TIMEOUT_S) -> "Distributed":
        """Join torchrun's process group (once per process) with the backend the device needs; a world of one when
        not launched by torchrun. ``device``: the run's device setting (None: CUDA when available)."""
        if not launched_by_torchrun():
            return cls(strategy, torch.device(device) if device else None)
        local_rank = int(os.environ["LOCAL_RANK"])
        kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
        if kind == "cuda":
            run_device = torch.device("cuda", local_rank)  # one GPU per local rank: torchrun's contract
            torch.cuda.set_device(run_device)
        else:
            run_device = torch.device(kind)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=run_device if kind == "cuda" else None)
            # Leave the group while the interpreter is still whole: gloo threads torn down during its finalisation
            # abort the process ("terminate called without an active exception", SIGABRT) after a run that succeeded.
            atexit.register(_leave_process_group)
        return cls(strategy, run_device, dist.get_rank(), dist.get_world_size(), local_rank)

    # -- who am I ---------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data -------------------------------------------------------------------------------------------------
    def local_batch(self, batch_size: int, micro_batch_size: int | None) -> tuple[int, int]:
        """(micro-batch size, accumulation steps) of this rank for a global ``batch_size``."""
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) is not a multiple of the "
                             f"{self.world_size} ranks")
        per_rank = batch_size // self.world_size
        micro = min(micro_batch_size or per_rank, per_rank)
        if per_rank % micro:
            raise ValueError(f"batch_size {batch_size} / {self.world_size} ranks = {per_rank} examples per rank, "
                             f"not a multiple of micro_batch_size {micro}")
        return micro, per_rank // micro

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's contiguous slice of a global batch (whose length is a multiple of the world size)."""
        per_rank = len(items) // self.world_size
        return items[self.rank * per_rank:(self.rank + 1) * per_rank]

    def strided(self, n: int) -> list[int]:
        """Indices ``rank, rank + world, ...`` of ``n`` things (evaluation batches, exact-match records)."""
        return list(range(self.rank, n, self.world_size))

    # -- collectives ------------------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    def sum(self, values: torch.Tensor | list[float]) -> torch.Tensor:
        """Element-wise sum over ranks, in float64 (counts stay exact); the input itself on one process."""
        tensor = torch.as_tensor(values, dtype=torch.float64)
        if not self.enabled:
            return tensor
        tensor = tensor.to(self._comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one small all-reduce)."""
        return bool(self.sum([float(flag)])[0] > 0)

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Differentiation-free sum over ranks of a device tensor (PPO's whitening statistics), same dtype."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def agreed(self, fn, *args, **kwargs):
        """Run ``fn`` on every rank; if it raised on any rank, every rank raises (the failing rank its own error,
        the others :class:`RankFailed` naming it) instead of waiting forever in the next collective."""
        try:
            result, error = fn(*args, **kwargs), None
        except Exception as e:  # any error: it is re-raised below on this rank, reported on the others
            result, error = None, e
        if not self.enabled:
            if error is not None:
                raise error
            return result
        reports = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, text) for r, text in enumerate(reports) if text]
        if failed:
            raise RankFailed(f"rank {failed[0][0]} failed: {failed[0][1]}")
        return result

    def broadcast(self, params: list[nn.Parameter]) -> None:
        """Give every rank rank 0's values of ``params`` (heads created outside the wrapped model)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    # -- gradients --------------------------------------------------------------------------------------------
    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip the global gradient norm; FSDP's sharded gradients (DTensors) give their norm over all shards.
        A head outside the sharded model (PPO's value head) has plain gradients: the two kinds are normed apart
        (torch refuses to mix them in one norm) and scaled by one coefficient."""
        grads = [p.grad for p in params if p.grad is not None]
        groups = [[g for g in grads if hasattr(g, "full_tensor")], [g for g in grads if not hasattr(g, "full_tensor")]]
        if not all(groups):  # one kind only: torch's own clipping
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        norms = [torch.nn.utils.get_total_norm(group) for group in groups]
        total = math.hypot(*(float(n.full_tensor() if hasattr(n, "full_tensor") else n) for n in norms))
        coefficient = max_norm / (total + 1e-6)
        if coefficient < 1.0:
            with torch.no_grad():
                for g in grads:
                    g.mul_(coefficient)
        return total

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of parameters outside the wrapped model (an objective's reward / value head),
        as DDP and FSDP do for those inside it."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # every rank must join the collective, used or not
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world_size

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Backward of a micro-batch; gradients are reduced over ranks only when ``sync`` (the last micro-batch of
        an optimiser step), as DDP's ``no_sync`` / FSDP2's ``set_requires_gradient_sync`` intend."""
        if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
            with model.no_sync():
                yield
            return
        if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
            model.set_requires_gradient_sync(sync)
        yield

    # -- wrapping ---------------------------------------------------------------------------------------------
    def reshard(self, model: nn.Module) -> None:
        """Put FSDP2's sharded parameters back on every module. After a forward with no backward (an evaluation)
        the root keeps its unsharded parameters registered; an optimiser built then, or a checkpoint read then,
        would hold or name tensors the training step no longer uses."""
        if not self.enabled or self.strategy != "fsdp":
            return
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def wrap(self, model: nn.Module, *, mixed_precision: bool = False, cpu_offload: bool = False) -> nn.Module:
        """The module the training forward goes through: DDP around ``model``, or ``model`` itself sharded in place
        by FSDP2 (each decoder block a unit, then the root). One process: ``model`` unchanged."""
        if not self.enabled:
            return model
        if self.strategy == "fsdp":
            shard_model(model, mixed_precision=mixed_precision, cpu_offload=cpu_offload)
            return model
        # Only trainable tensors get DDP's gradient hooks; find_unused_parameters covers trainable ones a forward
        # leaves out (a prompt method's encoder in an evaluation-only branch, AdaLoRA's pruned triplets).
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device is not None and self.device.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)
        # DDP.forward(*inputs, **kwargs) hides the model's keywords; objectives look for ``logits_to_keep`` there
        # (logits only where a loss needs them), so the wrapper advertises the model's own signature.
        def forward(*args, **kwargs):
            return nn.parallel.DistributedDataParallel.forward(ddp, *args, **kwargs)

        ddp.forward = functools.wraps(model.forward)(forward)
        return ddp


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_torchrun(nproc_per_node: int, args: list[str]) -> int:
    """Run ``python -m tuneforge ARGS`` under torchrun on this node (``--standalone``: its own rendezvous on a free
    port) and return its exit status; torchrun stops every process when one fails."""
    import subprocess
    import sys

    if launched_by_torchrun():
        raise ValueError("--nproc-per-node: this process already runs under torchrun; drop the flag")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
               "-m", "tuneforge", *args]
    log.info("starting %d processes: %s", nproc_per_node, " ".join(command))
    return subprocess.call(command)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the classes Hugging Face lists in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no decoder block class (_no_split_modules); FSDP cannot "
                         "shard it per block; use --distributed ddp")
    return blocks


def shard_model(model: nn.Module, *, mixed_precision: bool, cpu_offload: bool, forward_only: bool = False) -> None:
    """FSDP2 ``fully_shard`` per decoder block, then the root (embeddings, final norm, head, prompt encoders).

    ``forward_only``: a model that never runs backward (the frozen reference of DPO / PPO). FSDP2 keeps the root's
    parameters all-gathered after forward, for the backward that follows at once; with no backward they would stay
    whole on every rank for the rest of the run, so every unit, the root too, reshards after its forward."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": True} if forward_only else {}
    if mixed_precision:
        # bf16 all-gathers and compute; gradients reduced in float32, where summing many ranks' bf16 would round.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in decoder_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors gathered onto rank 0's CPU (an empty dict elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the context ``model.state_dict()`` returns ``state`` (gathered full tensors), so the method's own
    save code (PEFT's adapter files, ``save_pretrained``) writes a sharded model exactly as an unsharded one."""
    model.state_dict = lambda *args, **kwargs: dict(state)  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.state_dict
