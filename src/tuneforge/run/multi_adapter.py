"""Many LoRA adapters on one frozen base, trained side by side in one process (``adapters:`` in a run config).

Eight LoRA configurations trained one after another load the base eight times and run eight small forward passes
per step; side by side they share one load and one wide forward. Each adapter (a *lane*) is an ordinary run:
its own config (rank, alpha, dropout, target modules, learning rate and schedule, seed), its own data order, its
own run folder. Per step every lane draws its own micro-batches as its single run would; they are stacked
lane-major into one batch (padded to a common width and row count: padding that no real token attends to), and
every adapted layer adds each lane's update to its own rows in one batched product (``SideBySideLoRA``):

    y[lane] = W x[lane] + (x[lane] A_lane^T) B_lane^T * scale_lane        (ranks zero-padded to the largest)

The loss is split back per lane (token log-probabilities summed by row) and each lane's sum is divided by its own
supervised tokens, so the gradient reaching a lane's factors is exactly its single run's. One AdamW holds one
parameter group per lane with the lane's own learning rate, betas, weight decay and schedule; gradients are
clipped per lane. So each lane's per-step losses, gradients and final weights are those of its own run, to float
rounding (tests/test_multi_adapter.py checks it against separate runs).

Everything else is the trainer's own code, per lane: each lane is a :class:`~tuneforge.run.trainer.Trainer` built on
the shared model (its seed, its LoRA initialisation, its data, its sampler, its evaluation, its run folder), whose
LoRA layers are then lifted out and stacked. For evaluation and saving, one lane's layers are put back
(:meth:`SideBySide.solo`): the model is then exactly that lane's single-run model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..config import RunConfig, load_config
from ..data.batching import to_device
from ..data.template import IGNORE_INDEX
from ..errors import ConfigError, TrainingDiverged
from ..methods.base import replace_module
from ..methods.lora import LoRA, LoRALinear
from ..models.logprobs import supervised_positions, target_token_logps
from ..objectives.base import NextTokenObjective
from .evaluators import Evaluator, evaluators_for
from .model_setup import memory_line, peak_memory
from .optim import build_optimizer, lr_lambda
from .run_directory import TrainingState, check_run_output
from .tracking import Tracking
from .trainer import TOKENS_KEY, UNITS_KEY, TrainResult, Trainer
from .training_data import training_data

log = logging.getLogger(__name__)

ADAPTERS_KEY = "adapters"
# What may differ from lane to lane. Everything else (model, data, batch shape, steps, evaluation) is shared: the
# lanes read the same base and step together.
LANE_KEYS = {"method_options", "learning_rate", "weight_decay", "adam_betas", "warmup_steps", "warmup_ratio",
             "lr_scheduler", "max_grad_norm", "seed", "output"}
LANE_METHOD_OPTIONS = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights"}


# -- config ---------------------------------------------------------------------------------------------


@dataclass
class Lane:
    """One adapter of a side-by-side run: its name and its full run config."""

    name: str
    config: RunConfig


def is_side_by_side(path: str | Path) -> bool:
    """Whether the YAML file at ``path`` lists ``adapters:`` (a side-by-side run)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_config reports it
    return isinstance(data, dict) and ADAPTERS_KEY in data


def load_lanes(path: str | Path, overrides: dict[str, Any] | None = None) -> list[Lane]:
    """The lanes of a side-by-side config: the file's shared keys, then the command line's, then each entry of
    ``adapters:`` (its own ``name`` and overrides). Every lane is checked before anything loads."""
    data = yaml.safe_load(Path(path).read_text())
    entries = data.pop(ADAPTERS_KEY)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: {ADAPTERS_KEY} must be a non-empty list of mappings (one per adapter)")
    shared = {**data, **(overrides or {})}
    lanes = [_lane(path, i, entry, shared) for i, entry in enumerate(entries)]
    names = [lane.name for lane in lanes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: {ADAPTERS_KEY}: adapter names repeat ({', '.join(names)})")
    outputs = [lane.config.output for lane in lanes]
    if len(set(outputs)) != len(outputs):
        raise ConfigError(f"{path}: {ADAPTERS_KEY}: two adapters write to the same output")
    check_lanes(lanes, where=str(path))
    return lanes


def _lane(path, i: int, entry: Any, shared: dict[str, Any]) -> Lane:
    where = f"{path}: {ADAPTERS_KEY}[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {entry!r}")
    entry = dict(entry)
    name = str(entry.pop("name", f"adapter-{i}"))
    values = {**shared, **entry}
    values.setdefault("output", "runs/side-by-side")
    if "output" not in entry:  # each lane is a run folder of its own under the shared output
        values["output"] = str(Path(values["output"]) / name)
    try:
        return Lane(name, load_config(None, values))
    except ConfigError as e:
        raise ConfigError(f"{where} ({name}): {e}".replace(": command line:", ":")) from None


def lanes_from_configs(configs: list[RunConfig], names: list[str] | None = None) -> list[Lane]:
    """Lanes from ready configs (the sweep's trials); checked as a config file's are."""
    lanes = [Lane(names[i] if names else f"adapter-{i}", c) for i, c in enumerate(configs)]
    check_lanes(lanes, where="side-by-side")
    return lanes


def check_lanes(lanes: list[Lane], where: str) -> None:
    """Refuse, with the reason, what cannot train side by side: a ConfigError naming the lane and the key."""
    first = lanes[0].config
    for lane in lanes:
        reason = side_by_side_refusal(lane.config)
        if reason:
            raise ConfigError(f"{where}: adapter {lane.name}: {reason}")
        shared = lane.config.model_dump(exclude=LANE_KEYS)
        for key, value in first.model_dump(exclude=LANE_KEYS).items():
            if shared[key] != value:
                raise ConfigError(f"{where}: adapter {lane.name}: {key} differs from adapter {lanes[0].name}'s "
                                  f"({shared[key]!r} vs {value!r}); side-by-side adapters share everything but "
                                  f"{', '.join(sorted(LANE_KEYS))}")
        options, firsts = lane.config.method_config().to_dict(), first.method_config().to_dict()
        for key in sorted(set(options) - LANE_METHOD_OPTIONS):
            if options[key] != firsts[key]:
                raise ConfigError(f"{where}: adapter {lane.name}: method option {key} must be the same for every "
                                  f"adapter (may differ: {', '.join(sorted(LANE_METHOD_OPTIONS))})")


def side_by_side_refusal(config: RunConfig) -> str | None:
    """Why ``config`` cannot be one lane of a side-by-side run, or None."""
    method = config.method_class
    if method.trains_base_weights:
        return f"{method.name} changes the base weights, which side-by-side adapters share; train it on its own"
    if method is not LoRA:  # the batched layer computes plain LoRA's x·Aᵀ·Bᵀ·scale and nothing else
        return (f"{method.name} is not a plain LoRA update of linear layers (side-by-side adapters batch LoRA's "
                f"x·Aᵀ·Bᵀ per adapter); train it on its own")
    options = config.method_config()
    if options.use_dora:
        return "DoRA rescales each adapted weight by its own magnitude; train it on its own"
    if options.bias != "none":
        return f"bias={options.bias} trains the base's biases, which side-by-side adapters share"
    if options.init_lora_weights in ("pissa", "olora"):
        return f"init={options.init_lora_weights} rewrites the shared base weights; use the default init"
    if not issubclass(config.objective_class, NextTokenObjective):
        return (f"the {config.objective} objective's loss is not a sum of token cross-entropies that can be split "
                "by adapter; side-by-side adapters train sft or pretrain")
    refusals = {"streaming": config.streaming, "resume": config.resume, "save_every": config.save_every,
                "compile": config.compile, "distributed": config.distributed}
    for key, value in refusals.items():
        if value:
            return f"{key} is not supported side by side (a side-by-side run is one process, start to end)"
    if config.general_eval and config.general_eval.startswith("tasks:"):
        return "--general-eval tasks:... is not supported side by side; use builtin or a file"
    return None


# -- the batched layer ----------------------------------------------------------------------------------


class SideBySideLoRA(nn.Module):
    """``base_layer(x)`` plus each lane's LoRA update on that lane's rows, all lanes in one batched product.

    The lanes' own ``LoRALinear`` layers hold the trained factors (kept in a plain list: they are put back into
    the model one at a time for evaluation and saving); a lane that does not adapt this layer adds exact zeros."""

    def __init__(self, base_layer: nn.Module, lanes: list[LoRALinear | None]):
        super().__init__()
        self.base_layer = base_layer
        self.lanes = lanes
        self.rank = max(lane.r for lane in lanes if lane is not None)
        scaling = [lane.scaling if lane is not None else 0.0 for lane in lanes]
        self.register_buffer("scaling", torch.tensor(scaling, device=base_layer.weight.device), persistent=False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A: [lanes, rank, in]`` and ``B: [lanes, out, rank]``, smaller ranks padded with zeros (which add
        exact zeros and receive zero gradients)."""
        template = next(lane for lane in self.lanes if lane is not None)
        a_zero = template.lora_A.weight.new_zeros(self.rank, template.in_features)
        b_zero = template.lora_B.weight.new_zeros(template.out_features, self.rank)
        a = [F.pad(lane.lora_A.weight, (0, 0, 0, self.rank - lane.r)) if lane else a_zero for lane in self.lanes]
        b = [F.pad(lane.lora_B.weight, (0, self.rank - lane.r)) if lane else b_zero for lane in self.lanes]
        return torch.stack(a), torch.stack(b)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        a, b = self.factors()
        lanes = x.to(a.dtype).reshape(len(self.lanes), -1, x.shape[-1])  # rows are lane-major: [lanes, rows·t, in]
        if any(lane is not None and not isinstance(lane.lora_dropout, nn.Identity) for lane in self.lanes):
            lanes = torch.stack([lane.lora_dropout(part) if lane else part for lane, part in zip(self.lanes, lanes)])
        update = torch.bmm(torch.bmm(lanes, a.transpose(1, 2)), b.transpose(1, 2)) * self.scaling[:, None, None]
        return result + update.reshape(result.shape).to(result.dtype)


class SideBySide:
    """The lanes' LoRA layers stacked into ``SideBySideLoRA`` wrappers on the shared model."""

    def __init__(self, model: nn.Module, layers: list[dict[str, LoRALinear]]):
        self.model, self.layers = model, layers
        names = sorted({name for lane in layers for name in lane})
        self.wrappers = {}
        for name in names:
            base = model.get_submodule(name)
            self.wrappers[name] = SideBySideLoRA(base, [lane.get(name) for lane in layers])
        self._install_wrappers()

    def _install_wrappers(self) -> None:
        for name, wrapper in self.wrappers.items():
            replace_module(self.model, name, wrapper)

    @contextlib.contextmanager
    def solo(self, lane: int) -> Iterator[None]:
        """Inside: the model is lane ``lane``'s single-run model (its own LoRA layers, nobody else's)."""
        for name, wrapper in self.wrappers.items():
            replace_module(self.model, name, self.layers[lane].get(name, wrapper.base_layer))
        try:
            yield
        finally:
            self._install_wrappers()


def lane_trainer(config: RunConfig, model: nn.Module | None, tokenizer) -> tuple[Trainer, dict[str, LoRALinear]]:
    """A lane's trainer, built as its single run builds it (seed, then LoRA initialisation), and its LoRA layers,
    lifted out of the model again so that the next lane attaches to the bare base."""
    trainer = Trainer(config, model, tokenizer, Tracking(config.report_to))
    layers = dict(trainer.handle.lora_layers())
    trainer.handle.remove()
    return trainer, layers


# -- batches --------------------------------------------------------------------------------------------

# Padding per key: what a packed or padded batch already holds past its last real token.
PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0, "example_ids": -1}


def stack_lanes(batches: list[dict[str, Any]], pad_token_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """The lanes' micro-batches as one, lane-major, each padded to the widest row and the most rows (padding
    positions attend to nothing real and carry no label); returns it and the rows per lane."""
    rows = max(b["input_ids"].shape[0] for b in batches)
    width = max(b["input_ids"].shape[1] for b in batches)
    merged = {}
    for key in batches[0]:
        if not (torch.is_tensor(batches[0][key]) and batches[0][key].dim() == 2):
            continue
        fill = PAD_VALUES.get(key, pad_token_id)
        merged[key] = torch.cat([F.pad(b[key], (0, width - b[key].shape[1], 0, rows - b[key].shape[0]), value=fill)
                                 for b in batches])
    return merged, rows


def lane_loss_sums(model: nn.Module, batch: dict[str, torch.Tensor], lanes: int, rows: int) -> torch.Tensor:
    """Summed next-token cross-entropy of each lane's rows, ``[lanes]`` (each lane's ``NextTokenObjective.loss``)."""
    logps = target_token_logps(model, batch)
    keep = supervised_positions(batch["labels"])
    row = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    return torch.zeros(lanes, device=logps.device, dtype=logps.dtype).index_add(0, row // rows, -logps)


# -- the run --------------------------------------------------------------------------------------------


class SideBySideTrainer:
    """Trains the lanes together; each lane's run folder ends as its single run's would."""

    def __init__(self, lanes: list[Lane], model: nn.Module | None = None, tokenizer=None):
        self.lanes = lanes
        trainers, layers = [], []
        for lane in lanes:  # the first lane loads the base (as its single run would); the others reuse it
            trainer, lane_layers = lane_trainer(lane.config, model, tokenizer)
            model, tokenizer = trainer.model, trainer.tokenizer
            trainers.append(trainer)
            layers.append(lane_layers)
        self.trainers, self.model, self.tokenizer = trainers, model, tokenizer
        self.bank = SideBySide(model, layers)
        self.params = []
        for i, trainer in enumerate(trainers):
            with self.bank.solo(i):
                self.params.append(trainer.trainable())

    @property
    def first(self) -> Trainer:
        return self.trainers[0]

    def build_optimizer(self) -> None:
        """One AdamW, one parameter group per lane (two where a lane has 1-D tensors), each with the lane's own
        learning rate, betas and weight decay, and the lane's own schedule."""
        groups, schedules, self.group_of_lane = [], [], []
        for trainer, named in zip(self.trainers, self.params):
            self.group_of_lane.append(len(groups))
            for group in build_optimizer(named, trainer.config).param_groups:
                groups.append(group)
                schedules.append(lr_lambda(trainer.config, self.first.total_steps))
        self.optimizer = torch.optim.AdamW(groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedules)

    def step(self, batches: list[list[dict[str, torch.Tensor]]], step: int) -> list[dict[str, float]]:
        """One optimiser step of every lane: ``batches[lane]`` holds the lane's micro-batches."""
        n = len(self.trainers)
        units = torch.tensor([float(sum(b[UNITS_KEY] for b in lane)) for lane in batches])
        if bool((units == 0).any()):
            raise TrainingDiverged(f"step {step + 1}: a lane's batch has no supervised unit")
        device = next(self.model.parameters()).device
        losses = torch.zeros(n, device=device)
        pad = self.tokenizer.pad_token_id
        for k in range(len(batches[0])):
            merged, rows = stack_lanes([lane[k] for lane in batches], pad)
            with self.first.saved_activations():
                sums = lane_loss_sums(self.model, merged, n, rows)
            # Each lane's loss over its own units: lanes share no parameter, so each gets its single run's gradient.
            (sums / units.to(device)).sum().backward()
            losses += sums.detach()
        losses = (losses.cpu() / units).tolist()
        out = []
        for i, (trainer, named) in enumerate(zip(self.trainers, self.params)):
            if not math.isfinite(losses[i]):  # that lane's run would stop here
                raise TrainingDiverged(f"adapter {self.lanes[i].name}: step {step + 1}: loss is {losses[i]}")
            trainer.handle.after_backward(step)
            metrics = {"loss": losses[i], "units": int(units[i]), "tokens": sum(b[TOKENS_KEY] for b in batches[i])}
            if trainer.config.max_grad_norm:
                metrics["grad_norm"] = trainer.dist.clip_grad_norm([p for _, p in named],
                                                                   trainer.config.max_grad_norm)
            out.append(metrics)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, float]]:
        """Every lane's eval loss, as ``Trainer.evaluate_loss`` computes it alone: the same eval micro-batches,
        one copy per lane stacked into one forward, each lane's token losses over its own units."""
        first = self.first
        if not first.eval_items:
            return [{} for _ in self.trainers]
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        sums, units, n = torch.zeros(len(self.trainers), device=device), 0, len(self.trainers)
        for start in range(0, len(first.eval_items), first.micro):
            batch = to_device(first.objective.collate(first.eval_items[start:start + first.micro]), device)
            merged, rows = stack_lanes([batch] * n, self.tokenizer.pad_token_id)
            sums += lane_loss_sums(self.model, merged, n, rows)
            units += first.objective.units(batch)
        self.model.train(was_training)
        return [{"eval_loss": value / max(units, 1)} for value in sums.tolist()]

    def train(self, train_examples, eval_examples) -> list[TrainResult]:
        for i, trainer in enumerate(self.trainers):
            with self.bank.solo(i):
                if i == 0:
                    trainer.prepare_data(train_examples, eval_examples)
                else:  # the same objective, data and max_length: the first lane's tokenization serves every lane
                    trainer.use_data(self.first.train_items, self.first.eval_items)
                log.info("adapter %s: parameters: %s", self.lanes[i].name, trainer.parameter_report())
            trainer.run_dir.prepare(trainer.precision())
            trainer.tracking.start(trainer.output, trainer.config.model_dump(mode="json"))
        self.build_optimizer()
        samplers = [trainer.sampler() for trainer in self.trainers]
        if self.first.config.eval_before:
            for trainer, before in zip(self.trainers, self.evaluate()):
                if before:
                    trainer.run_dir.log({"step": 0, **before})
                    trainer.run_dir.keep_baseline({k.replace("eval_", "eval_before_", 1): v for k, v in before.items()})
        self.model.train()
        last: list[dict[str, Any]] = [{} for _ in self.trainers]
        c, t0, tokens = self.first.config, time.perf_counter(), [0] * len(self.trainers)
        bar = _progress_bar(c, self.first.total_steps, len(self.trainers))
        for step in range(self.first.total_steps):
            batches = [trainer.micro_batches(sampler) for trainer, sampler in zip(self.trainers, samplers)]
            metrics = self.step(batches, step)
            done, lrs = step + 1, self.scheduler.get_last_lr()
            evals = self.evaluate() if c.eval_every and done % c.eval_every == 0 and done < self.first.total_steps \
                else None
            for i, (trainer, sampler) in enumerate(zip(self.trainers, samplers)):
                tokens[i] += metrics[i]["tokens"]
                last[i] = {**metrics[i], "step": done, "lr": lrs[self.group_of_lane[i]], **sampler.progress(),
                           "tokens_per_s": round(tokens[i] / (time.perf_counter() - t0), 1)}
                if evals is not None:
                    last[i].update(evals[i])
                if done % c.log_every == 0 or done == self.first.total_steps:
                    trainer.run_dir.log(last[i])
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        results = []
        for i, (trainer, final) in enumerate(zip(self.trainers, self.evaluate())):
            if final:
                trainer.run_dir.log({"step": trainer.total_steps, **final})
            with self.bank.solo(i):
                state = TrainingState(trainer.model, trainer.handle, trainer.objective, trainer.trainable,
                                      self.optimizer, self.scheduler)
                trainer.run_dir.save_final(state, trainer.write_result)
                metrics = {**last[i], **final, **trainer.parameter_report(), **trainer.speed_report()}
            metrics.update(trainer.run_dir.baseline)
            results.append(TrainResult(trainer.output, trainer.total_steps, float(last[i].get("loss", "nan")),
                                       metrics, trainer.handle, self.model, self.tokenizer))
        return results


def _progress_bar(config: RunConfig, total: int, lanes: int):
    if not config.progress:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"train x{lanes}", unit="step", file=sys.stderr, dynamic_ncols=True)


def train_side_by_side(lanes: list[Lane], model: nn.Module | None = None, tokenizer=None) -> list[TrainResult]:
    """Train every lane together; each lane's folder holds an ordinary run (adapter, config, metrics, summary).

    As ``trainer.train`` per lane: the base model's exact match and general-text perplexity are measured once (they
    are the same base for every lane), each lane's after training."""
    started = time.perf_counter()
    config = lanes[0].config
    for lane in lanes:
        check_run_output(lane.config)
    data = training_data(config)
    evaluators = evaluators_for(config, data)
    runner = SideBySideTrainer(lanes, model, tokenizer)
    with contextlib.ExitStack() as stack:
        for trainer in runner.trainers:
            stack.enter_context(trainer.run_dir.lock())
            stack.enter_context(trainer.tracking)
        baseline = base_numbers(runner, evaluators)
        for trainer in runner.trainers:
            trainer.run_dir.keep_baseline(baseline)
        results = runner.train(data.train, data.eval)
        for i, (trainer, result) in enumerate(zip(runner.trainers, results)):
            with runner.bank.solo(i):
                for evaluator in evaluators:
                    evaluator.after(trainer, result.metrics)
            if len(data.sources) > 1:
                result.metrics["data_sources"] = data.sources
            peak = peak_memory(next(runner.model.parameters()).device)
            result.metrics.update(peak, train_wall_s=round(time.perf_counter() - started, 1),
                                  side_by_side={"adapters": len(lanes), "index": i})
            trainer.tracking.summary(result.metrics, trainer.total_steps)
            trainer.run_dir.write_summary(result.metrics)
        log.info(memory_line(peak))
    return results


def base_numbers(runner: SideBySideTrainer, evaluators: list[Evaluator]) -> dict[str, Any]:
    """The untouched base's numbers (exact match, general-text loss): one base, measured once for every lane."""
    first = runner.first
    with runner.bank.solo(0):
        for evaluator in evaluators:
            evaluator.before(first)
    return dict(first.run_dir.baseline)


def describe(results: list[TrainResult], lanes: list[Lane]) -> list[str]:
    """One line per adapter for the command's output."""
    lines = []
    for lane, result in zip(lanes, results):
        m = result.metrics
        parts = [f"adapter {lane.name}: {result.steps} steps -> {result.output}", f"train loss {m.get('loss', 0):.4f}"]
        if "eval_loss" in m:
            parts.append(f"eval loss {m['eval_loss']:.4f}")
        if "exact_match_after" in m:
            parts.append(f"exact match {m['exact_match_after']:.1%}")
        lines.append(", ".join(parts))
    return lines


__all__ = ["Lane", "SideBySide", "SideBySideLoRA", "SideBySideTrainer", "check_lanes", "describe", "is_side_by_side",
           "lanes_from_configs", "load_lanes", "side_by_side_refusal", "stack_lanes", "train_side_by_side"]
