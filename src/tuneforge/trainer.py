"""The one training loop, shared by every method and objective.

batch → loss → backward → clip → step → schedule → log → eval → checkpoint.

The loss of each micro-batch is summed over its units (tokens, pairs) and divided by the units of the whole
accumulated batch, so ``batch_size=8`` in one pass and ``micro_batch_size=2`` over four passes give the same
update. Checkpoints hold the trainable tensors, optimiser, scheduler, RNG and data position, and are written
atomically, so a run killed at any moment resumes to the weights an uninterrupted run reaches.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .config import RunConfig, save_config
from .data.formats import Example, load_examples
from .data.template import ensure_chat_template
from .methods.base import MethodHandle
from .models import load_model
from .objectives import TrainContext

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
DEMO_DIR = ASSETS / "demo"


# A micro-batch's loss units and tokens, counted on the host before the batch moves to the device: reading them
# back from the device would stall the step.
UNITS_KEY = "_units"
TOKENS_KEY = "_tokens"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float
    metrics: dict[str, Any] = field(default_factory=dict)
    handle: MethodHandle | None = None
    model: nn.Module | None = None
    tokenizer: Any = None


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- data -----------------------------------------------------------------------------------------------


def training_examples(config: RunConfig) -> tuple[list[Example], list[Example]]:
    """Train and eval examples: the user's files, a split of them, or the bundled demonstration task."""
    train_path = config.data or str(DEMO_DIR / "train.jsonl")
    eval_path = config.eval_data or (None if config.data else str(DEMO_DIR / "eval.jsonl"))
    train = load_examples(train_path, config.data_format)
    if eval_path:
        return train, load_examples(eval_path, config.data_format)
    if config.eval_split > 0:
        order = np.random.default_rng(config.seed).permutation(len(train))
        n_eval = max(1, int(round(len(train) * config.eval_split)))
        held = set(order[:n_eval].tolist())
        return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
    return train, []


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
    def __init__(self, config: RunConfig, model: nn.Module | None = None, tokenizer=None):
        self.config = config
        self.output = Path(config.output)
        seed_everything(config.seed)
        self.method = config.method_class
        if model is None:
            model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype,
                                          trust_remote_code=config.trust_remote_code,
                                          **self.method.model_load_kwargs(dict(config.method_options)))
        self.model, self.tokenizer = model, tokenizer
        ensure_chat_template(tokenizer, override=config.chat_template)
        self.objective = config.objective_class(tokenizer, config.objective_config())
        method_config = config.method_config()
        method_config.bind_tokenizer(tokenizer)  # e.g. prompt tuning initialised from a hard prompt's text
        # A method that changes the base weights has no adapter to switch off: DPO / PPO need a frozen copy,
        # taken before training starts.
        needs_copy = self.objective.needs_reference and self.method.trains_base_weights
        self.reference_model = self._frozen_copy(model) if needs_copy else None
        self.handle = self.method.attach(model, method_config)
        self._upcast_trainable()
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ctx = TrainContext(handle=self.handle, reference_model=self.reference_model)

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
    def prepare_data(self, train: list[Example], eval_: list[Example]) -> None:
        c = self.config
        self.train_items = self.objective.prepare(train, c.max_length, "train")
        self.eval_items = self.objective.prepare(eval_, c.max_length, "eval") if eval_ else []
        # PPO turns each batch of prompts into several optimiser steps (ppo epochs x mini-batches).
        batches = max(1, int(math.ceil(c.epochs * len(self.train_items) / c.batch_size)))
        self.total_steps = c.max_steps or batches * self.objective.optimizer_steps_per_batch()
        # Heads an objective adds (reward, value) must exist before the optimiser and the parameter report.
        self.objective.setup(self.model, self.ctx)

    def micro_batches(self, sampler: EpochSampler) -> list[dict[str, torch.Tensor]]:
        c = self.config
        device = next(self.model.parameters()).device
        out = []
        for _ in range(c.accumulation_steps):
            items = [self.train_items[i] for i in sampler.take(c.micro_batch)]
            batch = self.objective.collate(items)
            units = self.objective.units(batch)  # counted on the CPU copy: no device sync in the step
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            batch[UNITS_KEY], batch[TOKENS_KEY] = units, tokens
            out.append(batch)
        return out

    def next_steps(self, sampler: EpochSampler) -> list[list[dict[str, torch.Tensor]]]:
        """The optimiser steps (each a list of micro-batches) that the next batch of examples feeds: one, or for
        an online objective (PPO) a rollout on the batch and the several steps it makes."""
        if not self.objective.online:
            return [self.micro_batches(sampler)]
        items = [self.train_items[i] for i in sampler.take(self.config.batch_size)]
        return self.objective.rollout_steps(self.model, self.objective.collate(items), self.ctx)

    def optimizer_step(self, batches: list[dict[str, torch.Tensor]], step: int) -> dict[str, float]:
        total_units = sum(b[UNITS_KEY] if UNITS_KEY in b else self.objective.units(b) for b in batches)
        if total_units == 0:
            raise TrainingDiverged(f"step {step}: the batch has no supervised unit")
        sums: dict[str, Any] = {}
        total_loss = 0.0
        for batch in batches:
            loss_sum, metrics = self.objective.loss(self.model, batch, self.ctx)
            loss = loss_sum / total_units
            extra = self.handle.extra_loss()
            if extra is not None:
                loss = loss + extra / len(batches)
            loss.backward()
            total_loss = total_loss + loss.detach()
            for k, v in metrics.items():  # metric tensors stay on the device until the step ends: one sync
                sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else float(v))
        if not math.isfinite(float(total_loss)):
            raise TrainingDiverged(f"step {step}: loss is {float(total_loss)}")
        self.handle.after_backward(step)
        params = [p for _, p in self.trainable()]
        grad_norm = None
        if self.config.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"step {step}: gradient norm is {grad_norm}")
        self.optimizer.step()
        self.handle.after_step(step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: float(v) / total_units for k, v in sums.items()}
        out["units"] = total_units
        out["tokens"] = sum(b[TOKENS_KEY] if TOKENS_KEY in b else int(b["attention_mask"].sum())
                            for b in batches if TOKENS_KEY in b or "attention_mask" in b)
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
        bs = self.config.micro_batch
        for start in range(0, len(self.eval_items), bs):
            batch = self.objective.collate(self.eval_items[start:start + bs])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            units += self.objective.units(batch)
            _, metrics = self.objective.loss(self.model, batch, self.ctx)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train(was_training)
        return {f"eval_{k}": v / max(units, 1) for k, v in sums.items()}

    def train(self) -> TrainResult:
        c = self.config
        self._check_output_dir()
        self.output.mkdir(parents=True, exist_ok=True)
        save_config(c, self.output / "tuneforge.yaml")
        self.handle.begin_training(self.total_steps)
        self.optimizer = build_optimizer(self.trainable(), c)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(c, self.total_steps))
        sampler = EpochSampler(len(self.train_items), c.seed)
        start = self._resume(sampler) if c.resume else 0
        before: dict[str, float] = {}
        if start == 0:
            (self.output / "metrics.jsonl").unlink(missing_ok=True)
            before = self.evaluate_loss() if c.eval_before else {}
            if before:
                self._log({"step": 0, **before})
        else:
            self._drop_log_after(start)
        self.model.train()
        bar = _progress(c, self.total_steps, start)
        last: dict[str, float] = {}
        t0, tokens = time.perf_counter(), 0
        queued: list[list[dict[str, torch.Tensor]]] = []
        for step in range(start, self.total_steps):
            if not queued:
                queued = self.next_steps(sampler)
            last = self.optimizer_step(queued.pop(0), step)
            tokens += last.get("tokens", 0)
            done = step + 1
            last.update(step=done, lr=self.scheduler.get_last_lr()[0],
                        epoch=round(sampler.epoch + sampler.index / sampler.n, 3),
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
        device = next(self.model.parameters()).device
        metrics = {**last, **final, **self.parameter_report(), "peak_memory_mb": round(peak_memory_mb(device), 1)}
        metrics.update({key.replace("eval_", "eval_before_", 1): value for key, value in before.items()})
        log.info("peak memory: %.1f MB (%s)", metrics["peak_memory_mb"],
                 "CUDA allocated" if device.type == "cuda" else "process RSS")
        return TrainResult(self.output, self.total_steps, float(last.get("loss", float("nan"))), metrics,
                           self.handle, self.model, self.tokenizer)

    # -- persistence ----------------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        finished = (self.output / "tuneforge.yaml").exists() and (
            (self.output / "adapter_model.safetensors").exists() or (self.output / "config.json").exists())
        if finished and not (self.config.resume or self.config.overwrite):
            raise FileExistsError(f"{self.output} already holds a finished run; pass --overwrite or a new --output")

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
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}) + "\n")

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        state = {n: p.detach() for n, p in self.trainable()}
        state.update({f"method_state.{k}": v for k, v in self.handle.training_state().items()})
        state.update({f"objective_state.{k}": v for k, v in self.objective.training_state().items()})
        return state

    def save_checkpoint(self, step: int, sampler: EpochSampler) -> Path:
        path = self.output / "checkpoints" / f"step-{step}"
        with ckpt.atomic_directory(path) as tmp:
            ckpt.save_training_state(tmp, self._trainable_state(), self.optimizer, self.scheduler,
                                     {"step": step, **sampler.state()})
        kept = sorted((int(p.name.split("-")[1]), p) for p in path.parent.glob("step-*") if p.name[5:].isdigit())
        for _, old in kept[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def _resume(self, sampler: EpochSampler) -> int:
        path = ckpt.latest_checkpoint(self.output)
        if path is None:
            log.warning("--resume: no checkpoint in %s; starting from scratch", self.output)
            return 0
        trainable, state = ckpt.load_training_state(path)
        params = dict(self.trainable())
        with torch.no_grad():
            for name, p in params.items():
                if name not in trainable:
                    raise KeyError(f"{path}: checkpoint lacks trainable tensor {name!r} (different method/config?)")
                p.copy_(trainable[name])
        self.handle.load_training_state(_with_prefix(trainable, "method_state."))
        self.objective.load_training_state(_with_prefix(trainable, "objective_state."))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        progress = state["progress"]
        sampler.epoch, sampler.index = progress["epoch"], progress["index"]
        sampler._order = sampler._permutation()
        log.info("resumed from %s (step %d)", path, progress["step"])
        return int(progress["step"])

    def save_final(self) -> None:
        self.handle.save(self.output, base_model_name_or_path=self.config.model)
        self.objective.save(self.output)
        if self.method.trains_base_weights:
            self.tokenizer.save_pretrained(self.output)


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _progress(config: RunConfig, total: int, start: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def generation_metric(trainer: Trainer, examples: list[Example], base: bool) -> dict[str, Any] | None:
    """Exact match of greedy answers on chat eval data; ``base=True`` measures the untouched base model."""
    from .evaluate import exact_match

    c = trainer.config
    if not (c.eval_generate and examples and all(e.kind == "chat" for e in examples)):
        return None
    if base and not trainer.method.trains_base_weights:
        with trainer.handle.disabled():
            return exact_match(trainer.model, trainer.tokenizer, examples, max_new_tokens=c.eval_max_new_tokens,
                               limit=c.eval_limit)
    return exact_match(trainer.model, trainer.tokenizer, examples, max_new_tokens=c.eval_max_new_tokens,
                       limit=c.eval_limit)


def train(config: RunConfig, model: nn.Module | None = None, tokenizer=None) -> TrainResult:
    """Run one training job described by ``config`` (optionally on an already loaded model).

    With chat eval data, exact match is measured before (on the base model) and after training and returned in
    ``result.metrics`` as ``exact_match_before`` / ``exact_match_after``.
    """
    trainer = Trainer(config, model, tokenizer)
    train_examples, eval_examples = training_examples(config)
    trainer.prepare_data(train_examples, eval_examples)
    log.info("parameters: %s", trainer.parameter_report())
    before = None if config.resume else generation_metric(trainer, eval_examples, base=True)
    if before is not None:
        log.info("held-out exact match of the base model: %.1f%% (%d examples, %.1fs)", 100 * before["exact_match"],
                 before["n"], before["seconds"])
    result = trainer.train()
    after = generation_metric(trainer, eval_examples, base=False)
    for name, em in (("before", before), ("after", after)):
        if em is not None:
            result.metrics[f"exact_match_{name}"] = em["exact_match"]
            result.metrics[f"exact_match_{name}_seconds"] = em["seconds"]
    if after is not None:
        trainer._log({"step": trainer.total_steps, **{k: v for k, v in result.metrics.items()
                                                      if k.startswith("exact_match")}})
    return result
