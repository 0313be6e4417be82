"""The one training loop, shared by every method and objective.

batch → loss → backward → clip → step → schedule → log → eval → checkpoint.

The loss of each micro-batch is summed over its units (tokens, pairs) and divided by the units of the whole
accumulated batch, so ``batch_size=8`` in one pass and ``micro_batch_size=2`` over four passes give the same
update. Checkpoints hold the trainable tensors, optimiser, scheduler, RNG and data position, and are written
atomically, so a run killed at any moment resumes to the weights an uninterrupted run reaches.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from ..models import kernels
from ..inference.benchmarks import Benchmarks, flat_metrics, forgetting, local_task_paths, primary_keys, table
from ..config import RunConfig, save_config
from ..data.batching import to_device
from ..data.formats import Example, load_examples
from ..data.mixing import LoadedData, general_eval_file, general_eval_tasks, load_mixed, parse_sources
from ..data.packing import model_packing_refusal, real_tokens
from ..data.streaming import RecordStream, StreamSampler
from ..data.template import ensure_chat_template
from .distributed import Distributed, full_state_dict, launched_by_torchrun, plain_state_dict, shard_model
from ..errors import ResumeMismatch, TrainingDiverged, TuneforgeError
from ..methods.adapter_files import nonfinite_tensors
from ..methods.base import Method, MethodHandle
from ..models.loading import default_device, default_dtype, load_model, resolve_model_reference
from ..objectives import Objective, TrainContext
from ..outputs import OutputConflict, check_not_input
from .tracking import Tracking

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parents[1] / "assets"
DEMO_DIR = ASSETS / "demo"


# A micro-batch's loss units and tokens, counted on the host before the batch moves to the device: reading them
# back from the device would stall the step.
UNITS_KEY = "_units"
TOKENS_KEY = "_tokens"




@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float
    metrics: dict[str, Any] = field(default_factory=dict)
    handle: MethodHandle | None = None
    model: nn.Module | None = None
    tokenizer: Any = None


def peak_memory(device: torch.device) -> dict[str, float]:
    """The run's peak memory so far, in MB, each number named for what it counts.

    ``peak_rss_mb``: the process's max resident set (``getrusage``'s ``ru_maxrss``), the "maximum resident set size"
    ``/usr/bin/time -v`` reports: model loading and the evaluations before and after training included. On CUDA also
    ``peak_cuda_allocated_mb`` (the most memory tensors held on ``device``) and ``peak_cuda_reserved_mb`` (the most
    the caching allocator held, closer to what nvidia-smi shows). ``peak_memory_mb`` stays for readers of earlier
    runs (compare, trackers): CUDA allocated on a GPU, the process max RSS otherwise."""
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(maxrss / (2**20 if sys.platform == "darwin" else 1024), 1)}  # bytes on macOS, KiB else
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    out["peak_memory_mb"] = out.get("peak_cuda_allocated_mb", out["peak_rss_mb"])
    return out


def memory_line(peak: dict[str, float]) -> str:
    """``peak_memory``'s numbers in words, for the log."""
    line = f"peak memory: process max RSS {peak['peak_rss_mb']:,.0f} MB"
    if "peak_cuda_allocated_mb" in peak:
        line += (f", CUDA max allocated {peak['peak_cuda_allocated_mb']:,.0f} MB, max reserved "
                 f"{peak['peak_cuda_reserved_mb']:,.0f} MB")
    return line


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- data -----------------------------------------------------------------------------------------------


def training_examples(config: RunConfig) -> tuple[list[Example], list[Example]]:
    """Train and eval examples: the user's files, a split of them, or the bundled demonstration task."""
    data = training_data(config)
    return data.train, data.eval


def training_data(config: RunConfig) -> LoadedData:
    """The examples and, for a mix of sources, what each source gave (see ``data/mixing.py``)."""
    if config.data in (None, "demo"):  # the bundled demonstration task, its own held-out split for eval
        eval_path = config.eval_data or str(DEMO_DIR / "eval.jsonl")
        return LoadedData(load_examples(DEMO_DIR / "train.jsonl", config.data_format),
                          load_examples(eval_path, config.data_format))
    if config.streaming:
        return streamed_data(config)
    data = load_mixed(config.data, config.data_format, config.seed, 0.0 if config.eval_data else config.eval_split)
    if config.eval_data:
        data.eval = load_examples(config.eval_data, config.data_format)
    return data


def checkpoint_blocks(model: nn.Module, every: int = 1) -> list[bool]:
    """Gradient checkpointing on every ``every``-th decoder block (transformers' per-layer switch), re-entrant-free so
    that frozen inputs and adapters work; returns which blocks recompute."""
    # transformers 5.24 renamed the switch (the old name warns); earlier releases have only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i % every == 0
    return [block.gradient_checkpointing for block in blocks]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks, in order (transformers' per-layer checkpointing unit)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every decoder block in place (``--compile``), with dynamic shapes: packed rows change width
    from step to step. The blocks share one graph, so the compile happens once. Returns the blocks compiled."""
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def packing_refusal(method: type[Method], objective: Objective, model: nn.Module) -> str | None:
    """Why a run of ``method`` and ``objective`` on ``model`` cannot pack several examples into a row, or None."""
    if not objective.packable:
        return f"the {objective.name} objective builds its own batches"
    if method.packing_refusal:
        return f"{method.name} cannot pack: {method.packing_refusal}"
    return model_packing_refusal(model)


STREAMING_IN_ONE_PROCESS = ("--streaming runs in one process: each rank would need its own disjoint part of the "
                            "stream (not supported yet); train without torchrun, or without --streaming")


def streamed_data(config: RunConfig) -> LoadedData:
    """``--streaming``: the training records as a stream (see ``data/streaming.py``); eval data, small, in memory."""
    if launched_by_torchrun():
        raise TuneforgeError(STREAMING_IN_ONE_PROCESS)
    stream = RecordStream(parse_sources(config.data), config.data_format, config.seed, config.shuffle_buffer)
    eval_ = load_examples(config.eval_data, config.data_format) if config.eval_data else []
    return LoadedData([], eval_, stream=stream)


class EpochSampler:
    """Deterministic shuffled order per epoch, with a position that checkpoints can save and restore."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()

    def progress(self) -> dict[str, float]:
        return {"epoch": round(self.epoch + self.index / self.n, 3)}


Sampler = EpochSampler | StreamSampler  # where training items come from: memory (by index) or a stream


# -- optimiser and schedule ---------------------------------------------------------------------------


def lr_lambda(config: RunConfig, total_steps: int):
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def learning_rate(config: RunConfig) -> float:
    return config.learning_rate if config.learning_rate is not None else config.method_class.default_learning_rate


def build_optimizer(named: list[tuple[str, nn.Parameter]], config: RunConfig) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and 1-D tensors (standard practice; decaying a gain toward 0 hurts).
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate(config), betas=config.adam_betas)


# -- the run --------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: RunConfig, model: nn.Module | None = None, tokenizer=None,
                 tracking: Tracking | None = None):
        self.config = config
        self.output = Path(config.output)
        self.model_reference = resolve_model_reference(config.model)
        self.tracking = tracking or Tracking()  # experiment trackers (--report-to): train() opens and closes them
        self._lock_depth = 0
        self.run_record: dict[str, Any] = {}
        # The "before" numbers (eval loss, exact match, general perplexity of the untouched model). Kept in run.json
        # as soon as they are measured, so a resumed run, which cannot measure them again, still reports its gain.
        self.baseline: dict[str, Any] = {}
        seed_everything(config.seed)
        self.method = config.method_class
        # Under torchrun: join the process group; this rank's device (cuda:LOCAL_RANK, or the CPU with gloo).
        self.dist = Distributed.from_env(config.distributed_strategy, config.device)
        if model is None:
            device = str(self.dist.device) if self.dist.enabled else (config.device or str(default_device()))
            load_kwargs = self.method.model_load_kwargs(dict(config.method_options))
            dtype = config.dtype
            if dtype == "auto":  # a frozen float base computes in bf16 on a CPU that does so natively
                dtype = default_dtype(device, frozen_base=not self.method.trains_base_weights and not load_kwargs)
            model, tokenizer = load_model(config.model, device=device, dtype=dtype,
                                          trust_remote_code=config.trust_remote_code, **load_kwargs)
        self.model, self.tokenizer = model, tokenizer
        device = next(model.parameters()).device
        # Optional GPU kernels (tuneforge[gpu]) the run uses: flash-attn came in with the load, liger patches here.
        self.kernels = {name: version for name, version in kernels.usable(device).items()
                        if name != "liger_kernel" or kernels.apply_liger(model, device)}
        if "flash_attn" in self.kernels and model.config._attn_implementation != "flash_attention_2":
            del self.kernels["flash_attn"]  # installed, but this model was loaded with another attention
        ensure_chat_template(tokenizer, override=config.chat_template)
        self.objective = config.objective_class(tokenizer, config.objective_config())
        method_config = config.method_config()
        method_config.bind_tokenizer(tokenizer)  # e.g. prompt tuning initialised from a hard prompt's text
        # A method that changes the base weights has no adapter to switch off: DPO / PPO need a frozen copy,
        # taken before training starts.
        needs_copy = self.objective.needs_reference and self.method.trains_base_weights
        self.reference_model = self._frozen_copy(model) if needs_copy else None
        self.handle = self.method.attach(model, method_config)
        self.objective.pack_capacity = config.max_length if self._packs(model) else None
        self._upcast_trainable()
        if config.gradient_checkpointing:
            checkpoint_blocks(model, config.checkpoint_every)
        if config.compile:
            compile_blocks(model)
        self.train_model = self._wrap(model)  # the training forward's module: DDP / FSDP2 under torchrun, else model
        self.ctx = TrainContext(handle=self.handle, reference_model=self.reference_model,
                                sum_across_ranks=self.dist.sum_tensor if self.dist.enabled else None,
                                any_across_ranks=self.dist.any if self.dist.enabled else None)

    def saved_activations(self) -> contextlib.AbstractContextManager:
        """Where the forward keeps what backward needs: on the model's device, or (``--offload-activations``) in
        pinned CPU memory, copied back as backward reaches each tensor."""
        if not self.config.offload_activations:
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=next(self.model.parameters()).device.type == "cuda")

    def speed_report(self) -> dict[str, Any]:
        """What this run computed with: packed or padded batches, the attention kernel, optional GPU kernels."""
        return {"packing": self.objective.pack_capacity is not None,
                "attention": getattr(self.model.config, "_attn_implementation", None),
                "kernels": dict(self.kernels)}

    def _packs(self, model: nn.Module) -> bool:
        """Whether batches are packed (``--packing``): by default wherever it is exact; insisting where it is not
        is an error naming why."""
        reason = packing_refusal(self.method, self.objective, model)
        if reason is None:
            return self.config.packing is not False
        if self.config.packing:
            raise ValueError(f"packing: {reason}; run with --packing false")
        log.info("padded batches: %s", reason)
        return False

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return model
        fsdp = self.dist.strategy == "fsdp"
        mixed = fsdp and self.dist.device.type == "cuda" and torch.cuda.is_bf16_supported()
        if fsdp and self.reference_model is not None:  # the frozen copy is sharded the same way
            shard_model(self.reference_model, mixed_precision=mixed, cpu_offload=self.config.fsdp_cpu_offload,
                        forward_only=True)
        return self.dist.wrap(model, mixed_precision=mixed, cpu_offload=self.config.fsdp_cpu_offload)

    def _upcast_trainable(self) -> None:
        # As PEFT's autocast_adapter_dtype: adapters train in float32 even over a bf16 base (bf16 AdamW updates
        # round small steps away). Full fine-tuning keeps the model's dtype.
        if self.method.trains_base_weights:
            return
        for _, p in self.handle.trainable_parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        log.info("full fine-tuning: keeping a frozen copy of the base model as the reference")
        reference = copy.deepcopy(model)
        reference.requires_grad_(False).eval()
        return reference

    # -- parameters ---------------------------------------------------------------------------------
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        named = list(self.handle.trainable_parameters())
        return named + [(f"objective.{n}", p) for n, p in self.objective.extra_parameters()]

    def parameter_report(self) -> dict[str, int]:
        trainable = sum(p.numel() for _, p in self.trainable())
        total = self.handle.num_total_parameters()
        return {"trainable_params": trainable, "total_params": total}

    # -- main loop ------------------------------------------------------------------------------------
    def prepare_data(self, train: list[Example] | RecordStream, eval_: list[Example]) -> None:
        c = self.config
        # A stream is tokenized a chunk at a time as training reads it (``sampler``); max_steps sizes the run.
        stream = train if isinstance(train, RecordStream) else None
        train_items = [] if stream else self.objective.prepare(train, c.max_length, "train")
        self.use_data(train_items, self.objective.prepare(eval_, c.max_length, "eval") if eval_ else [], stream)

    def use_data(self, train_items: list[Any], eval_items: list[Any], stream: RecordStream | None = None) -> None:
        """Train on items already prepared by this run's objective (or by an identical one: side-by-side adapters
        share one tokenization); sizes the run."""
        c = self.config
        self.train_stream, self.train_items, self.eval_items = stream, train_items, eval_items
        # PPO turns each batch of prompts into several optimiser steps (ppo epochs x mini-batches).
        batches = max(1, int(math.ceil(c.epochs * len(self.train_items) / c.batch_size)))
        self.total_steps = c.max_steps or batches * self.objective.optimizer_steps_per_batch()
        self.micro, self.accumulation = self.dist.local_batch(c.batch_size, c.micro_batch_size)
        remainder = len(self.train_items) % c.batch_size
        if remainder and self.dist.enabled and self.dist.is_main:
            # Nothing is dropped: the epoch's last global batch is completed with the next epoch's first examples.
            log.info("%d examples = %d global batches of %d + %d (completed from the next epoch), over %d ranks",
                     len(self.train_items), len(self.train_items) // c.batch_size, c.batch_size, remainder,
                     self.dist.world_size)
        # Heads an objective adds (reward, value) must exist before the optimiser and the parameter report.
        self.objective.setup(self.model, self.ctx)
        self.dist.broadcast([p for _, p in self.objective.extra_parameters()])  # one starting head for all ranks

    def sampler(self) -> Sampler:
        if self.train_stream is None:
            return EpochSampler(len(self.train_items), self.config.seed)
        return StreamSampler(self.train_stream, self._prepare_chunk)

    def _prepare_chunk(self, examples: list[Example]) -> tuple[list[Any], Any]:
        items = self.objective.prepare(examples, self.config.max_length, "train")
        return items, self.objective.length_report

    def draw(self, sampler: Sampler, k: int) -> list[Any]:
        """The next ``k`` training items: by index from memory, or straight from the stream."""
        if isinstance(sampler, StreamSampler):
            return sampler.take(k)
        return [self.train_items[i] for i in sampler.take(k)]

    def micro_batches(self, sampler: Sampler) -> list[dict[str, torch.Tensor]]:
        c = self.config
        device = next(self.model.parameters()).device
        out = []
        mine = self.dist.shard(self.draw(sampler, c.batch_size))  # every rank draws the global batch, keeps its slice
        for k in range(self.accumulation):
            items = mine[k * self.micro:(k + 1) * self.micro]
            batch = self.objective.collate(items)
            units = self.objective.units(batch)  # counted on the CPU copy: no device sync in the step
            tokens = real_tokens(batch)
            batch = to_device(batch, device, non_blocking=True)
            batch[UNITS_KEY], batch[TOKENS_KEY] = units, tokens
            out.append(batch)
        return out

    def next_steps(self, sampler: Sampler) -> list[list[dict[str, torch.Tensor]]]:
        """The optimiser steps (each a list of micro-batches) that the next batch of examples feeds: one, or for
        an online objective (PPO) a rollout on the batch and the several steps it makes."""
        if not self.objective.online:
            return [self.micro_batches(sampler)]
        items = self.dist.shard(self.draw(sampler, self.config.batch_size))
        return self.objective.rollout_steps(self.model, self.objective.collate(items), self.ctx)  # rollouts per rank

    def optimizer_step(self, batches: list[dict[str, torch.Tensor]], step: int) -> dict[str, float]:
        local_units = sum(b[UNITS_KEY] if UNITS_KEY in b else self.objective.units(b) for b in batches)
        local_tokens = sum(b[TOKENS_KEY] if TOKENS_KEY in b else real_tokens(b) for b in batches)
        # The units of the whole global batch (host counts, one small all-reduce): every rank divides by them.
        total_units, total_tokens = (int(x) for x in self.dist.sum([local_units, local_tokens]).tolist())
        if total_units == 0:
            raise TrainingDiverged(f"step {step + 1}: the batch has no supervised unit")
        # DDP / FSDP average gradients over ranks; scaled by the world size, the average is the sum of every rank's
        # loss over the global units: the single-process gradient of the same global batch.
        sums: dict[str, Any] = {}
        total_loss = 0.0
        for i, batch in enumerate(batches):
            with self.saved_activations():
                loss_sum, metrics = self.objective.loss(self.train_model, batch, self.ctx)
            loss = loss_sum * self.dist.world_size / total_units
            extra = self.handle.extra_loss()
            if extra is not None:
                loss = loss + extra / len(batches)
            with self.dist.accumulating(self.train_model, sync=i == len(batches) - 1):
                loss.backward()
            total_loss = total_loss + loss.detach()
            for k, v in metrics.items():  # metric tensors stay on the device until the step ends: one sync
                sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else float(v))
        self.dist.average_gradients([p for _, p in self.objective.extra_parameters()])
        keys = list(sums)  # the same objective code on every rank: the same keys in the same order
        reduced = self.dist.sum([float(total_loss)] + [float(sums[k]) for k in keys]).tolist()
        if not math.isfinite(reduced[0]):  # the same verdict on every rank: all stop together
            raise TrainingDiverged(f"step {step + 1}: loss is {reduced[0]}; {self._kept()}")
        self.handle.after_backward(step)
        params = [p for _, p in self.trainable()]
        grad_norm = None
        if self.config.max_grad_norm:
            grad_norm = self.dist.clip_grad_norm(params, self.config.max_grad_norm)
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"step {step + 1}: gradient norm is {grad_norm}; {self._kept()}")
        self.optimizer.step()
        self.handle.after_step(step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v / total_units for k, v in zip(keys, reduced[1:])}
        out["units"] = total_units
        out["tokens"] = total_tokens
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    @torch.no_grad()
    def evaluate_loss(self) -> dict[str, float]:
        if not self.eval_items:
            return {}
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        sums: dict[str, float] = {}
        units = 0
        starts = list(range(0, len(self.eval_items), self.micro))
        # Batches go round-robin over the ranks; every rank runs the same number of forwards (FSDP's all-gathers
        # pair up across ranks), a rank past the end repeating the last batch and discarding it.
        rounds = -(-len(starts) // self.dist.world_size)
        for j in (r * self.dist.world_size + self.dist.rank for r in range(rounds)):
            start = starts[min(j, len(starts) - 1)]
            batch = self.objective.collate(self.eval_items[start:start + self.micro])
            batch = to_device(batch, device)
            _, metrics = self.objective.loss(self.model, batch, self.ctx)
            if j >= len(starts):
                continue
            units += self.objective.units(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train(was_training)
        if self.dist.enabled:  # eval loss and metrics over the whole eval set, every rank's share
            gathered = self.dist.gather((sums, units))
            units = sum(u for _, u in gathered)
            keys = dict.fromkeys(k for s, _ in gathered for k in s)  # a rank may have had no batch
            sums = {k: sum(s.get(k, 0.0) for s, _ in gathered) for k in keys}
        return {f"eval_{k}": v / max(units, 1) for k, v in sums.items()}

    def train(self) -> TrainResult:
        with self.output_lock():
            return self._train()

    def _train(self) -> TrainResult:
        c = self.config
        # Rank 0 owns the run directory; the others wait for it (and stop with its error if it refuses the run).
        self.dist.agreed(self._prepare_output if self.dist.is_main else lambda: None)
        self.tracking.start(self.output, c.model_dump(mode="json"))
        self.handle.begin_training(self.total_steps)
        self.dist.reshard(self.model)  # an evaluation before training (forgetting, exact match) left it unsharded
        self.optimizer = build_optimizer(self.trainable(), c)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(c, self.total_steps))
        sampler = self.sampler()
        start = self._resume(sampler) if c.resume else 0
        before: dict[str, float] = {}
        if start == 0:
            if self.dist.is_main:
                (self.output / "metrics.jsonl").unlink(missing_ok=True)
            before = self.evaluate_loss() if c.eval_before else {}
            if before:
                self._log({"step": 0, **before})
                self.keep_baseline({key.replace("eval_", "eval_before_", 1): v for key, v in before.items()})
        elif self.dist.is_main:
            self._drop_log_after(start)
        self.model.train()
        bar = _progress(c, self.total_steps, start) if self.dist.is_main else None
        last: dict[str, float] = {}
        t0, tokens = time.perf_counter(), 0
        queued: list[list[dict[str, torch.Tensor]]] = []
        for step in range(start, self.total_steps):
            if not queued:  # a data or reward-function error on one rank stops every rank with it
                queued = self.dist.agreed(self.next_steps, sampler)
            last = self.optimizer_step(queued.pop(0), step)
            tokens += last.get("tokens", 0)
            done = step + 1
            last.update(step=done, lr=self.scheduler.get_last_lr()[0], **sampler.progress(),
                        tokens_per_s=round(tokens / (time.perf_counter() - t0), 1))
            if c.eval_every and done % c.eval_every == 0 and done < self.total_steps:
                last.update(self.evaluate_loss())
            if done % c.log_every == 0 or done == self.total_steps:
                self._log(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
            if c.save_every and done % c.save_every == 0 and done < self.total_steps:
                self.save_checkpoint(done, sampler)
        if bar is not None:
            bar.close()
        final = self.evaluate_loss()
        if final:
            self._log({"step": self.total_steps, **final})
        self.save_final()
        # Peak memory is read by train(), once the evaluations after training (which can use more) are done too.
        metrics = {**last, **final, **self.parameter_report(), **self.speed_report()}
        metrics.update(self.baseline)
        return TrainResult(self.output, self.total_steps, float(last.get("loss", float("nan"))), metrics,
                           self.handle, self.model, self.tokenizer)

    # -- persistence ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def output_lock(self) -> Iterator[None]:
        """Hold the run directory for this run (re-entrant within it): a second run into it is refused."""
        owner = self.dist.is_main  # one lock per run: rank 0 holds it for every rank
        if self._lock_depth == 0 and owner:
            self.output.mkdir(parents=True, exist_ok=True)
            self._lock = ckpt.OutputLock(self.output).__enter__()
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and owner:
                self._lock.__exit__(None, None, None)

    def _prepare_output(self) -> None:
        """Refuse to clobber a finished or resumable run; clear what a killed process left; record this run."""
        c, record = self.config, ckpt.read_run_record(self.output)
        _refuse_foreign_output(c)  # checked before the lock too; here again, now that this process owns the folder
        if record is not None:
            finished = bool(record.get("finished"))
        else:  # a run from before run.json existed
            finished = (self.output / "tuneforge.yaml").exists() and (
                (self.output / "adapter_model.safetensors").exists() or (self.output / "config.json").exists())
        if finished and not (c.resume or c.overwrite):
            raise FileExistsError(f"{self.output} already holds a finished run; pass --overwrite or a new --output")
        resumable = ckpt.latest_checkpoint(self.output)
        if resumable is not None and not (c.resume or c.overwrite or finished):
            raise FileExistsError(f"{self.output} holds an unfinished run with a checkpoint ({resumable.name}); "
                                  "pass --resume to continue it, or --overwrite to start over")
        ckpt.remove_leftovers(self.output)
        if not c.resume or record is None:
            # A new run owns the directory: the previous run's files (checkpoints, log, a full model's weights beside
            # a new adapter) would otherwise mix with its own, or be resumed as if they were this run's.
            _empty_run_directory(self.output)
            record = {"run_id": uuid.uuid4().hex, "finished": False}
        else:  # resuming: what the interrupted run measured before its first step is still the baseline
            self.baseline = {**record.get("baseline", {}), **self.baseline}
        self.run_record = {**record, "finished": False, "baseline": self.baseline, "precision": self.precision()}
        ckpt.write_run_record(self.output, self.run_record)
        # A local base is recorded by absolute path: `generate --adapter` from another folder must find the same
        # model, not take "mdl/tiny" for a hub id.
        save_config(c.model_copy(update={"model": self.model_reference}), self.output / "tuneforge.yaml")

    def precision(self) -> dict[str, str]:
        """Where and in which dtype the (frozen) base computed: `eval` and `generate` on the run default to the
        same, so the exact match they report is the one training reported."""
        frozen = [p for p in self.model.parameters() if not p.requires_grad and p.is_floating_point()]
        dtype = (frozen or list(self.model.parameters()))[0].dtype
        return {"device": next(self.model.parameters()).device.type, "dtype": str(dtype).removeprefix("torch.")}

    def keep_baseline(self, numbers: dict[str, Any]) -> None:
        """Record "before" numbers; once the run directory is prepared they are written to run.json at once."""
        self.baseline.update(numbers)
        if self.dist.is_main and self.run_record:
            self.run_record["baseline"] = self.baseline
            ckpt.write_run_record(self.output, self.run_record)

    def _kept(self) -> str:
        last = ckpt.latest_checkpoint(self.output)
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    def resume_signature(self) -> dict[str, Any]:
        """The settings a checkpoint's tensors and schedule depend on; ``--resume`` must not change them."""
        return self.config.model_dump(mode="json", exclude=RESUMABLE_CHANGES)

    def _drop_log_after(self, step: int) -> None:
        # A run killed after its last checkpoint logged steps the resumed run does again: keep one record per step
        # (and drop a line the kill cut short).
        path = self.output / "metrics.jsonl"
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

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.dist.is_main:  # every rank holds the reduced values; one writes them
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracking.log(record)  # the trackers get exactly the values the file has

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {**{n: p.detach() for n, p in self.trainable()}, **self._extra_state()}

    def _extra_state(self) -> dict[str, torch.Tensor]:
        """Method and objective state that is not a parameter (AdaLoRA's importance averages), whole: a sharded
        tensor among it is gathered (a collective under FSDP)."""
        from torch.distributed.tensor import DTensor

        state = {f"method_state.{k}": v for k, v in self.handle.training_state().items()}
        state.update({f"objective_state.{k}": v for k, v in self.objective.training_state().items()})
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}

    @property
    def _shards_checkpoints(self) -> bool:
        return self.dist.enabled and self.dist.strategy == "fsdp"

    def save_checkpoint(self, step: int, sampler: Sampler) -> Path:
        path = self.output / "checkpoints" / f"step-{step}"
        # DDP replicas hold identical tensors: rank 0 writes them, with every rank's RNG (dropout differs per rank).
        rngs = self.dist.gather(ckpt.rng_state())
        rng = rngs[0] if len(rngs) == 1 else {"ranks": rngs}
        if self._shards_checkpoints:
            self._write_sharded_checkpoint(path, step, sampler, rng)
        else:
            self.dist.agreed(self._write_checkpoint if self.dist.is_main else lambda *a: None, path, step, sampler,
                             rng)
        return path

    def _write_sharded_checkpoint(self, path: Path, step: int, sampler: Sampler, rng: dict[str, Any]) -> None:
        """FSDP: every rank writes its shards (DCP) into one temporary directory, rank 0 adds the training state and
        renames the directory into place only after every rank's write succeeded."""
        d, heads = self.dist, self.objective.extra_parameters()
        d.reshard(self.model)  # an --eval-every pass just before may have left the root unsharded
        state = ckpt.sharded_state(self.model, heads, self.optimizer)
        d.agreed(check_finite, ckpt.local_shards(state["model"]), f"step {step}: trainable tensors", self._kept())
        extra = self._extra_state()
        target = ckpt.atomic_directory(path, tag=d.gather(os.getpid())[0])
        d.agreed(target.__enter__ if d.is_main else lambda: None)
        try:
            ckpt.save_sharded(target.tmp, state)
            d.agreed(self._write_training_state if d.is_main else lambda *a: None, target.tmp, extra, None, step,
                     sampler, rng)
        except BaseException as e:
            if d.is_main:
                target.__exit__(type(e), e, None)  # removes the temporary directory
            raise
        d.agreed(self._publish_sharded if d.is_main else lambda *a: None, target)

    def _publish_sharded(self, target: ckpt.atomic_directory) -> None:
        target.__exit__(None, None, None)  # every rank wrote: rename into place
        self._rotate_checkpoints()

    def _write_checkpoint(self, path: Path, step: int, sampler: Sampler, rng: dict[str, Any]) -> None:
        with ckpt.atomic_directory(path) as tmp:
            self._write_training_state(tmp, self._trainable_state(), self.optimizer, step, sampler, rng)
        self._rotate_checkpoints()

    def _write_training_state(self, directory: Path, state: dict[str, torch.Tensor], optimizer, step: int,
                              sampler: Sampler, rng: dict[str, Any]) -> None:
        check_finite(state, f"step {step}: trainable tensors", self._kept())  # a NaN is never a "good" checkpoint
        progress = {"step": step, **sampler.state(), "run_id": self.run_record["run_id"],
                    "signature": self.resume_signature()}
        ckpt.save_training_state(directory, state, optimizer, self.scheduler, progress, rng=rng)

    def _rotate_checkpoints(self) -> None:
        root = self.output / "checkpoints"
        kept = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name[5:].isdigit())
        for _, old in kept[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self, sampler: Sampler) -> int:
        """Continue from the newest checkpoint that reads back whole (a corrupt one falls back to the one before)."""
        partly_read = False
        for path in ckpt.checkpoints_newest_first(self.output):
            try:  # agreed: every rank moves on to the same checkpoint (the sharded read below is a collective)
                trainable, state = self.dist.agreed(self._read_checkpoint, path)
            except Exception as e:  # safetensors, torch and JSON each raise their own type for a damaged file
                log.warning("--resume: %s is unreadable (%s); trying the checkpoint before it", path, e)
                continue
            self._check_resume_settings(path, state["progress"])
            if ckpt.is_sharded(path):
                try:  # DCP raises on every rank when one rank's read fails
                    ckpt.load_sharded(path, self.model, self.objective.extra_parameters(), self.optimizer)
                except Exception as e:
                    log.warning("--resume: %s is unreadable (%s); trying the checkpoint before it", path, e)
                    partly_read = True
                    continue
            return self._restore(path, trainable, state, sampler)
        if partly_read:  # DCP reads in place: the weights and optimiser state are no longer the starting ones
            raise TuneforgeError(f"--resume: no checkpoint in {self.output} reads back whole; start over with "
                                 "--overwrite")
        log.warning("--resume: no usable checkpoint in %s; starting from scratch", self.output)
        return 0

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        trainable, state = ckpt.load_training_state(path)
        check_finite(trainable, str(path), "")
        return trainable, state

    def _check_resume_settings(self, path: Path, progress: dict[str, Any]) -> None:
        if self._shards_checkpoints and not ckpt.is_sharded(path):
            raise ResumeMismatch(f"--resume: {path} holds whole tensors (a DDP or single-process run's); resume it "
                                 "with --distributed ddp")
        saved = progress.get("signature")
        if saved is None:  # a checkpoint from before signatures were recorded
            return
        changed = sorted(k for k in set(saved) | set(self.resume_signature())
                         if saved.get(k) != self.resume_signature().get(k))
        if changed:
            raise ResumeMismatch(f"--resume: {path} was written with different settings ({', '.join(changed)}); "
                                 "resume with the run's own settings, or start a new run with --overwrite")

    def _restore(self, path: Path, trainable: dict[str, torch.Tensor], state: dict[str, Any],
                 sampler: Sampler) -> int:
        if not ckpt.is_sharded(path):  # a sharded checkpoint's tensors and optimiser state are restored already
            with torch.no_grad():
                for name, p in self.trainable():
                    if name not in trainable:
                        raise KeyError(f"{path}: checkpoint lacks trainable tensor {name!r} (different method/config?)")
                    p.copy_(trainable[name])
            self.optimizer.load_state_dict(state["optimizer"])
        self.handle.load_training_state(_with_prefix(trainable, "method_state."))
        self.objective.load_training_state(_with_prefix(trainable, "objective_state."))
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(self._own_rng(state["rng"]))
        progress = state["progress"]
        sampler.restore(progress)
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

    def save_final(self) -> None:
        """Write the result into a staging directory, move it into place, then mark the run finished: a kill at any
        moment leaves either no result or a whole one, never a truncated weight file that looks finished.

        Rank 0 writes; under FSDP every rank first joins the all-gather of the full weights, which rank 0 then saves
        through the method's own code, so the files are those a single process writes."""
        if not (self.dist.enabled and self.dist.strategy == "fsdp"):
            self.dist.agreed(self._write_final if self.dist.is_main else lambda *a: None, self._trainable_state())
            return
        full = full_state_dict(self.model)
        final = {n: full[n] for n, _ in self.handle.trainable_parameters()} if self.dist.is_main else {}
        with plain_state_dict(self.model, full):
            self.dist.agreed(self._write_final if self.dist.is_main else lambda *a: None, final)

    def _write_final(self, trainable: dict[str, torch.Tensor]) -> None:
        check_finite(trainable, "final weights", self._kept())
        staging = self.output / f".final.tmp{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        self.handle.save(staging, base_model_name_or_path=self.model_reference)
        self.objective.save(staging)
        if self.method.trains_base_weights:
            self.tokenizer.save_pretrained(staging)
        ckpt.publish(staging, self.output)
        self.run_record["finished"] = True
        ckpt.write_run_record(self.output, self.run_record)


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


def check_run_output(config: RunConfig) -> None:
    """Before anything loads: the run's output is none of its inputs (the base model, the data), nor inside one,
    nor a folder that holds one. Not even --overwrite lifts this: `--output` = the base model would replace it."""
    inputs: list[str | None] = [config.model, config.eval_data, general_eval_file(config.general_eval),
                                *local_task_paths(general_eval_tasks(config.general_eval))]
    inputs += [source.path for source in parse_sources(config.data)]
    check_not_input(config.output, inputs)
    _refuse_foreign_output(config)


def _refuse_foreign_output(config: RunConfig) -> None:
    """A folder with someone else's files is replaced by a new run only with --overwrite, and never resumed into (a run
    of ours is checked later, in ``Trainer._prepare_output``, which knows finished from resumable)."""
    output = Path(config.output)
    if not config.overwrite and ckpt.read_run_record(output) is None and _holds_foreign_files(output):
        raise OutputConflict(f"--output {output} exists and is not empty (and holds no tuneforge run); pass "
                             "--overwrite to replace it, or choose another output")


# Settings --resume may change: where and how often things are written, evaluated and shown.
RESUMABLE_CHANGES = {"output", "resume", "overwrite", "progress", "device", "trust_remote_code", "eval_every",
                     "general_eval", "general_eval_limit",
                     "eval_before", "eval_generate", "eval_max_new_tokens", "eval_limit", "log_every", "save_every",
                     "keep_checkpoints", "report_to", "distributed", "fsdp_cpu_offload",
                     # memory for time: the same arithmetic
                     "gradient_checkpointing", "checkpoint_every", "offload_activations", "compile"}


def check_finite(tensors: dict[str, torch.Tensor], what: str, kept: str) -> None:
    bad = list(nonfinite_tensors(tensors))
    if bad:
        raise TrainingDiverged(f"{what}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:3])})"
                               + (f"; {kept}" if kept else ""))


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _progress(config: RunConfig, total: int, start: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def generation_metric(trainer: Trainer, examples: list[Example], base: bool) -> dict[str, Any] | None:
    """Exact match of greedy answers on chat eval data; ``base=True`` measures the untouched base model."""

    c = trainer.config
    if not (c.eval_generate and examples and all(e.kind == "chat" for e in examples)):
        return None
    if base and not trainer.method.trains_base_weights:
        with trainer.handle.disabled():
            return _exact_match_over_ranks(trainer, examples)
    return _exact_match_over_ranks(trainer, examples)


def _exact_match_over_ranks(trainer: Trainer, examples: list[Example]) -> dict[str, Any]:
    """Exact match, each DDP rank generating a strided share of the records. An FSDP model's forwards are
    collectives that must pair up across ranks, so there every rank generates every record (the same answers)."""
    from ..inference.evaluate import exact_match

    c, d = trainer.config, trainer.dist
    examples = examples[:c.eval_limit]
    if not d.enabled or d.strategy == "fsdp":
        return exact_match(trainer.model, trainer.tokenizer, examples, max_new_tokens=c.eval_max_new_tokens)
    mine = [examples[i] for i in d.strided(len(examples))]
    em = (exact_match(trainer.model, trainer.tokenizer, mine, max_new_tokens=c.eval_max_new_tokens) if mine
          else {"exact_match": 0.0, "n": 0, "seconds": 0.0})
    shares = d.gather((em["exact_match"] * em["n"], em["n"], em["seconds"]))
    n = sum(share[1] for share in shares)
    return {"exact_match": sum(share[0] for share in shares) / n, "n": n,
            "seconds": max(share[2] for share in shares)}


def train(config: RunConfig, model: nn.Module | None = None, tokenizer=None) -> TrainResult:
    """Run one training job described by ``config`` (optionally on an already loaded model).

    With chat eval data, exact match is measured before (on the base model) and after training and returned in
    ``result.metrics`` as ``exact_match_before`` / ``exact_match_after``.
    """
    started = time.perf_counter()
    check_run_output(config)  # an output that would replace the base model or the data: refused before anything loads
    tracking = Tracking(config.report_to)  # a tracker library that is not installed fails here, before the model loads
    data = training_data(config)  # and so does bad data
    general = general_examples(config)
    benchmarks = general_benchmarks(config)  # lm-eval's tasks found (a typo fails here), before the model loads
    trainer = Trainer(config, model, tokenizer, tracking)
    with trainer.output_lock(), tracking:  # the trackers' runs are closed, marked failed, if training raises
        result = _train_with_forgetting(trainer, config, data, general, benchmarks)
        peak = peak_memory(next(trainer.model.parameters()).device)
        log.info(memory_line(peak))
        # From the call to here: loading, the evaluations before and after, training, saving (not interpreter start).
        result.metrics.update(peak, train_wall_s=round(time.perf_counter() - started, 1))
        tracking.summary(result.metrics, trainer.total_steps)
        if trainer.dist.is_main:
            write_summary(result)
        return result


SUMMARY_NAME = "summary.json"
GENERAL_MAX_LENGTH = 128


def write_summary(result: TrainResult) -> Path:
    """The run's final metrics as one JSON file (``tuneforge compare`` reads it; so can any script)."""
    path = result.output / SUMMARY_NAME
    ckpt.write_text_atomic(path, json.dumps(result.metrics, indent=1, default=str))
    return path


def general_examples(config: RunConfig) -> list[Example]:
    """The general text whose perplexity measures forgetting (``--general-eval``); loaded before the model."""
    path = general_eval_file(config.general_eval)
    return load_examples(path) if path else []


def general_benchmarks(config: RunConfig) -> Benchmarks | None:
    """``--general-eval tasks:NAME[,NAME]``: lm-evaluation-harness tasks measured before and after training."""
    tasks = general_eval_tasks(config.general_eval)
    if not tasks:
        return None
    return Benchmarks(tasks, limit=config.general_eval_limit)


def benchmark_metric(trainer: Trainer, benchmarks: Benchmarks | None, base: bool) -> dict[str, Any] | None:
    """The benchmarks on the trained model, or (``base=True``) on the untouched base: adapter off, as
    ``general_metric``; a full fine-tune is still the base before its first step, and has no base left on resume."""
    if benchmarks is None or (base and trainer.method.trains_base_weights and trainer.config.resume):
        return None
    context = trainer.handle.disabled() if base and not trainer.method.trains_base_weights else contextlib.nullcontext()
    with context:
        return benchmarks.evaluate(trainer.model, trainer.tokenizer) or None  # {}: not rank 0


def general_metric(trainer: Trainer, examples: list[Example], base: bool) -> dict[str, float] | None:
    """Perplexity on general text; ``base=True``: the untouched base (adapter off; a resumed full fine-tune has no
    untouched copy left, so none)."""
    from ..inference.evaluate import general_perplexity

    if not examples:
        return None
    c = trainer.config
    # The built-in passages are ~100 tokens: a short task's max_length (the demo's 64) should not cut them.
    max_length = max(c.max_length, GENERAL_MAX_LENGTH)
    config = trainer.model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions:  # never past the positions the model has (GPT-2's learned table ends there)
        max_length = min(max_length, positions)
    if base and trainer.method.trains_base_weights:
        return None if c.resume else general_perplexity(trainer.model, trainer.tokenizer, examples, max_length)
    context = trainer.handle.disabled() if base else contextlib.nullcontext()
    with context:
        return general_perplexity(trainer.model, trainer.tokenizer, examples, max_length)


def _train_with_forgetting(trainer: Trainer, config: RunConfig, data: LoadedData, general: list[Example],
                           benchmarks: Benchmarks | None = None) -> TrainResult:
    """Training, with general-text perplexity or benchmarks before and after (forgetting) and the data mix in the
    metrics."""
    before = general_metric(trainer, general, base=True)
    if before is not None:
        trainer.keep_baseline({"general_loss_before": before["loss"], "general_ppl_before": before["perplexity"]})
    scores = benchmark_metric(trainer, benchmarks, base=True)
    if scores is not None:
        log.info("benchmarks of the base model:\n%s", table(scores))
        trainer.keep_baseline(flat_metrics(scores, "before"))
    result = _train_with_exact_match(trainer, config, data.stream or data.train, data.eval)
    after = general_metric(trainer, general, base=False)
    m = result.metrics  # holds the "before" numbers, this process's or those the interrupted run kept (resume)
    scores = benchmark_metric(trainer, benchmarks, base=False)
    if scores is not None:  # benchmark_<task>_<metric>_after and forgetting_<task>, as general_* below
        log.info("benchmarks after training:\n%s", table(scores))
        keys = primary_keys(scores)
        m.update(flat_metrics(scores, "after"), benchmarks=keys)
        m.update(forgetting(m, keys))
    if after is not None:
        m.update(general_loss_after=after["loss"], general_ppl_after=after["perplexity"])
        if "general_loss_before" in m:  # > 0: general text got less likely (forgetting); the log-ratio of perplexities
            m["forgetting"] = after["loss"] - m["general_loss_before"]
        # In the metrics, summary.json and the trackers' summary; not a metrics.jsonl line (one record per step).
        log.info("general-text perplexity (forgetting): %s%.3f", f"{m['general_ppl_before']:.3f} -> "
                 if "general_ppl_before" in m else "", after["perplexity"])
    if len(data.sources) > 1:
        m["data_sources"] = data.sources
    elif data.stream is not None and len(data.stream.sources) > 1:  # what the stream gave, known once it was read
        m["data_sources"] = data.stream.summary()
    if "data_sources" in m:  # the mix beside the run's other records (one line, at the last step)
        trainer._log({"step": trainer.total_steps, "data_sources": m["data_sources"]})
    return result


def _train_with_exact_match(trainer: Trainer, config: RunConfig, train_examples: list[Example] | RecordStream,
                            eval_examples: list[Example]) -> TrainResult:
    trainer.prepare_data(train_examples, eval_examples)
    log.info("parameters: %s", trainer.parameter_report())
    # A resumed run's baseline was measured by the run it continues (run.json); measured here only when it was not.
    kept = (ckpt.read_run_record(trainer.output) or {}).get("baseline", {}) if config.resume else {}
    before = None if "exact_match_before" in kept else generation_metric(trainer, eval_examples, base=True)
    if before is not None:
        log.info("held-out exact match of the base model: %.1f%% (%d examples, %.1fs)", 100 * before["exact_match"],
                 before["n"], before["seconds"])
        trainer.keep_baseline({"exact_match_before": before["exact_match"],
                               "exact_match_before_seconds": before["seconds"]})
    result = trainer.train()  # its metrics carry the baseline: this process's, or the interrupted run's (resume)
    after = generation_metric(trainer, eval_examples, base=False)
    if after is not None:
        result.metrics.update(exact_match_after=after["exact_match"], exact_match_after_seconds=after["seconds"])
        trainer._log({"step": trainer.total_steps, **{k: v for k, v in result.metrics.items()
                                                      if k.startswith("exact_match")}})
    return result
