"""The one training loop, shared by every method and objective.

batch → loss → backward → clip → step → schedule → log → eval → checkpoint.

The loss of each micro-batch is summed over its units (tokens, pairs) and divided by the units of the whole
accumulated batch, so ``batch_size=8`` in one pass and ``micro_batch_size=2`` over four passes give the same
update. What the run leaves on disk (lock, run.json, metrics, atomic checkpoints, resume, the staged final save) is
``run_directory.py``'s; what it measures before and after training is ``evaluators.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import RunConfig
from ..data.batching import to_device
from ..data.formats import Example
from ..data.packing import real_tokens
from ..data.streaming import RecordStream, StreamSampler
from ..data.template import ensure_chat_template
from ..errors import TrainingDiverged
from ..methods.base import MethodHandle
from ..models import kernels
from ..models.loading import default_device, default_dtype, load_model, resolve_model_reference
from ..models.moe_router import RouterMonitor
from ..models.rope_scaling import apply_rope_scaling
from ..models.tiled_mlp import tile_mlps
from ..objectives import TrainContext
from .context_parallel import check_world
from .context_parallel import setup as context_parallel
from .distributed import Distributed
from .evaluators import evaluators_for
from .model_setup import (checkpoint_blocks, compile_blocks, frozen_copy, memory_line, packing_refusal, peak_memory,
                          upcast_trainable, wrap_for_ranks)
from .optim import build_optimizer, lr_lambda
from .run_directory import RunDirectory, TrainingState, check_run_output
from ..vision import scope as vision_scope
from ..vision.loading import is_vision_model
from .tracking import Tracking
from .training_data import DEMO_DIR, EpochSampler, Sampler, training_data, training_examples

__all__ = ["Trainer", "TrainResult", "train", "training_examples", "DEMO_DIR", "EpochSampler", "TrainingDiverged"]

log = logging.getLogger(__name__)

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: RunConfig, model: nn.Module | None = None, tokenizer=None,
                 tracking: Tracking | None = None):
        self.config = config
        self.output = Path(config.output)
        self.model_reference = resolve_model_reference(config.model)
        self.tracking = tracking or Tracking()  # experiment trackers (--report-to): train() opens and closes them
        seed_everything(config.seed)
        self.method = config.method_class
        # Under torchrun: join the process group; this rank's device (cuda:LOCAL_RANK, or the CPU with gloo).
        self.dist = Distributed.from_env(config.distributed_strategy, config.device)
        check_world(config.context_parallel, self.dist.world_size)  # before the model loads
        self.run_dir = RunDirectory(config, self.dist, self.tracking, self.model_reference)
        if model is None:
            device = str(self.dist.device) if self.dist.enabled else (config.device or str(default_device()))
            load_kwargs = self.method.model_load_kwargs(dict(config.method_options))
            dtype = config.dtype
            if dtype == "auto":  # a frozen float base computes in bf16 on a CPU that does so natively
                dtype = default_dtype(device, frozen_base=not self.method.trains_base_weights and not load_kwargs)
            model, tokenizer = load_model(config.model, device=device, dtype=dtype,
                                          trust_remote_code=config.trust_remote_code, **load_kwargs)
        self.model, self.tokenizer = model, tokenizer
        if config.rope_scaling:  # before the reference copy and the adapter: both read the stretched positions
            apply_rope_scaling(model, config.rope_scaling, config.rope_factor)
        self.kernels = kernels.apply_usable(model)  # optional GPU kernels (tuneforge[gpu]) this run uses
        ensure_chat_template(tokenizer, override=config.chat_template)
        self.objective = config.objective_class(tokenizer, config.objective_config())
        method_config = config.method_config()
        method_config.bind_tokenizer(tokenizer)  # e.g. prompt tuning initialised from a hard prompt's text
        # A vision-language model: its image limit, the method checked, LoRA narrowed to the language model unless
        # --tune-vision / --tune-projector (vision/scope.py).
        method_config = vision_scope.prepare_run(model, tokenizer, self.method, method_config,
                                                 tune_vision=config.tune_vision, tune_projector=config.tune_projector,
                                                 max_image_pixels=config.max_image_pixels)
        # A method that changes the base weights has no adapter to switch off: DPO / PPO need a frozen copy,
        # taken before training starts.
        needs_copy = self.objective.needs_reference and self.method.trains_base_weights
        self.reference_model = frozen_copy(model) if needs_copy else None
        self.handle = self.method.attach(model, method_config)
        if self.method.trains_base_weights and is_vision_model(model):
            vision_scope.freeze_untrained_parts(model, config.tune_vision, config.tune_projector)
        self.router = RouterMonitor(model)  # MoE: the model's load-balancing loss and per-expert token counts
        self.objective.pack_capacity = config.max_length if self._packs(model) else None
        upcast_trainable(self.method, self.handle)
        if config.tiled_mlp:
            tile_mlps(model, config.tiled_mlp)
        if config.gradient_checkpointing:
            checkpoint_blocks(model, config.checkpoint_every)
        if config.compile:
            compile_blocks(model)
        # --context-parallel: this rank's share of every sequence (None: whole sequences)
        self.context = context_parallel(config.context_parallel, self.dist, model, self.objective, self.method)
        # The training forward's module: DDP / FSDP2 under torchrun, else the model itself.
        self.train_model = wrap_for_ranks(self.dist, model, self.reference_model, self.config.fsdp_cpu_offload)
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
            if self.context is not None:  # this rank's tokens of every row; its own targets and tokens counted
                batch = self.context.shard(batch)
                units, tokens = self.context.units(batch), self.context.tokens(batch)
            else:
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
                loss_sum, metrics = (self.context or self.objective).loss(self.train_model, batch, self.ctx)
            loss = loss_sum * self.dist.world_size / total_units
            extra = self.handle.extra_loss()
            if extra is not None:
                loss = loss + extra / len(batches)
            router_loss = self.router.take_loss()
            if router_loss is not None:
                loss = loss + router_loss / len(batches)
            with self.dist.accumulating(self.train_model, sync=i == len(batches) - 1):
                loss.backward()
            total_loss = total_loss + loss.detach()
            for k, v in metrics.items():  # metric tensors stay on the device until the step ends: one sync
                sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else float(v))
        self.dist.average_gradients([p for _, p in self.objective.extra_parameters()])
        keys = list(sums)  # the same objective code on every rank: the same keys in the same order
        reduced = self.dist.sum([float(total_loss)] + [float(sums[k]) for k in keys]).tolist()
        if not math.isfinite(reduced[0]):  # the same verdict on every rank: all stop together
            raise TrainingDiverged(f"step {step + 1}: loss is {reduced[0]}; {self.run_dir.kept()}")
        self.handle.after_backward(step)
        params = [p for _, p in self.trainable()]
        grad_norm = None
        if self.config.max_grad_norm:
            grad_norm = self.dist.clip_grad_norm(params, self.config.max_grad_norm)
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"step {step + 1}: gradient norm is {grad_norm}; {self.run_dir.kept()}")
        self.optimizer.step()
        self.handle.after_step(step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v / total_units for k, v in zip(keys, reduced[1:])}
        out["units"] = total_units
        out["tokens"] = total_tokens
        out.update(self.router.take_metrics())
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
            _, metrics = self.objective.evaluation_loss(self.model, batch, self.ctx)
            if j >= len(starts):
                continue
            units += self.objective.evaluation_units(batch)
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
        with self.run_dir.lock():
            return self._train()

    def training_state(self) -> TrainingState:
        return TrainingState(self.model, self.handle, self.objective, self.trainable, self.optimizer, self.scheduler)

    def _train(self) -> TrainResult:
        c, run_dir = self.config, self.run_dir
        # Rank 0 owns the run directory; the others wait for it (and stop with its error if it refuses the run).
        self.dist.on_main(run_dir.prepare, self.precision())
        self.tracking.start(self.output, c.model_dump(mode="json"))
        self.handle.begin_training(self.total_steps)
        self.dist.reshard(self.model)  # an evaluation before training (forgetting, exact match) left it unsharded
        self.optimizer = build_optimizer(self.trainable(), c)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(c, self.total_steps))
        sampler = self.sampler()
        start = run_dir.resume(self.training_state(), sampler) if c.resume else 0
        run_dir.start_log(start)
        if start == 0 and c.eval_before:
            before = self.evaluate_loss()
            if before:
                run_dir.log({"step": 0, **before})
                run_dir.keep_baseline({key.replace("eval_", "eval_before_", 1): v for key, v in before.items()})
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
                run_dir.log(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
            if c.save_every and done % c.save_every == 0 and done < self.total_steps:
                run_dir.save_checkpoint(self.training_state(), done, sampler)
        if bar is not None:
            bar.close()
        final = self.evaluate_loss()
        if final:
            run_dir.log({"step": self.total_steps, **final})
        run_dir.save_final(self.training_state(), self.write_result)
        # Peak memory is read by train(), once the evaluations after training (which can use more) are done too.
        metrics = {**last, **final, **self.parameter_report(), **self.speed_report(), **run_dir.baseline}
        return TrainResult(self.output, self.total_steps, float(last.get("loss", float("nan"))), metrics,
                           self.handle, self.model, self.tokenizer)

    def write_result(self, folder: Path) -> None:
        """The trained result, in the method's own files (an adapter, or a whole model with its tokenizer)."""
        self.handle.save(folder, base_model_name_or_path=self.model_reference)
        self.objective.save(folder)
        if self.method.trains_base_weights:
            self.tokenizer.save_pretrained(folder)

    def precision(self) -> dict[str, str]:
        """Where and in which dtype the (frozen) base computed: `eval` and `generate` on the run default to the
        same, so the exact match they report is the one training reported."""
        frozen = [p for p in self.model.parameters() if not p.requires_grad and p.is_floating_point()]
        dtype = (frozen or list(self.model.parameters()))[0].dtype
        return {"device": next(self.model.parameters()).device.type, "dtype": str(dtype).removeprefix("torch.")}


def train(config: RunConfig, model: nn.Module | None = None, tokenizer=None) -> TrainResult:
    """Run one training job described by ``config`` (optionally on an already loaded model).

    With chat eval data, exact match is measured before (on the base model) and after training and returned in
    ``result.metrics`` as ``exact_match_before`` / ``exact_match_after``; likewise forgetting (``--general-eval``).
    """
    started = time.perf_counter()
    check_run_output(config)  # an output that would replace the base model or the data: refused before anything loads
    tracking = Tracking(config.report_to)  # a tracker library that is not installed fails here, before the model loads
    data = training_data(config)  # and so does bad data
    evaluators = evaluators_for(config, data)  # and a missing general-text file or lm-eval task
    trainer = Trainer(config, model, tokenizer, tracking)
    with trainer.run_dir.lock(), tracking:  # the trackers' runs are closed, marked failed, if training raises
        trainer.prepare_data(data.stream or data.train, data.eval)
        log.info("parameters: %s", trainer.parameter_report())
        for evaluator in evaluators:
            evaluator.before(trainer)
        result = trainer.train()  # its metrics carry the baseline: this process's, or the interrupted run's (resume)
        for evaluator in evaluators:
            evaluator.after(trainer, result.metrics)
        mix = data.mix()
        if mix:  # what each source of a mix gave: in the metrics, and one line at the last step of metrics.jsonl
            result.metrics["data_sources"] = mix
            trainer.run_dir.log({"step": trainer.total_steps, "data_sources": mix})
        peak = peak_memory(next(trainer.model.parameters()).device)
        log.info(memory_line(peak))
        # From the call to here: loading, the evaluations before and after, training, saving (not interpreter start).
        result.metrics.update(peak, train_wall_s=round(time.perf_counter() - started, 1))
        tracking.summary(result.metrics, trainer.total_steps)
        trainer.dist.on_main(trainer.run_dir.write_summary, result.metrics)
        return result


def _progress(config: RunConfig, total: int, start: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
