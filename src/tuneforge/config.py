"""The run config: model, method, objective, data, training — from YAML, overridden by flags.

Every key can be written in the YAML file or given as a flag (``learning_rate: 1e-4`` or
``--learning-rate 1e-4``); flags win. Method options live under ``method_options`` (``lora_r`` in YAML is also
accepted as ``--lora-r`` and lands in ``method_options.r``: each method and objective declares its own prefix).

Resolution and validation happen here, before anything loads: the method and objective names (aliases included)
resolve through their registries to one canonical name, and their options are built into the method's and the
objective's typed option dataclasses, so an unknown key or a bad value is an error naming it, not a surprise
after the model has loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .flags import read_yaml_mapping
from .methods.base import METHODS, Method, MethodConfig
from .models.loading import DEFAULT_MODEL
from .objectives.base import OBJECTIVES, Objective, ObjectiveConfig
from .options import option_names
from .run.tracking import tracker_names


class RunConfig(BaseModel):
    """Everything a training run needs. Each field says what it does; defaults suit the embedded demo."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # -- what to train ----------------------------------------------------------------------------
    model: str = Field(DEFAULT_MODEL, description="Embedded name, local HF directory, .gguf file or hub id.")
    method: str = Field("lora", description="How the model changes (`tuneforge methods` compares them).")
    method_options: dict[str, Any] = Field(default_factory=dict, description="The method's config fields, e.g. "
                                           "{r: 16, lora_alpha: 32}; see `tuneforge methods`.")
    objective: str = Field("sft", description="What is optimised.")
    objective_options: dict[str, Any] = Field(default_factory=dict, description="The objective's options, e.g. "
                                              "{beta: 0.1} for DPO or {train_on_prompt: true} for SFT.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub model (off: safety).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it; on a CPU with bf16 instructions (AVX512-BF16, "
        "AMX) bf16 for a frozen base under adapters (they train in float32); float32 otherwise.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ...; default: cuda if available.")
    distributed: Literal["ddp", "fsdp"] | None = Field(
        None, description="Under torchrun: ddp (a replica per rank) or fsdp (FSDP2, weights sharded per decoder "
        "block); default: fsdp for full fine-tuning, ddp for adapter methods.")
    fsdp_cpu_offload: bool = Field(False, description="FSDP: keep sharded parameters, gradients and optimiser "
                                   "state in CPU memory (slower; for models that do not fit otherwise).")

    # -- data ---------------------------------------------------------------------------------------
    data: str | list[str | dict[str, Any]] | None = Field(
        None, description="Training data file (jsonl/json/csv/parquet) or hub id; default: the bundled demonstration "
        "task. Several sources mix by weight: `--data a.jsonl:0.8 --data general:0.2` (general: the built-in "
        "general-text replay set), or a YAML list of path:weight / {path, weight}.")
    eval_data: str | None = Field(None, description="Held-out data; default: the demo's eval split, or "
                                  "eval_split of `data`.")
    data_format: str = Field("auto", description="The records' shape; auto detects it from the first record's keys.")
    eval_split: float = Field(0.0, ge=0.0, lt=1.0,
        description="Fraction of `data` held out for evaluation when eval_data is unset.")
    chat_template: str | None = Field(None, description="Force a fallback template (chatml, alpaca, plain); "
                                      "default: the tokenizer's own, chatml if it has none.")
    general_eval: str | None = Field("builtin", description="General text whose perplexity before and after "
                                     "training measures forgetting: builtin (the shipped general set), a file "
                                     "of text/chat records, or none; or tasks:NAME[,NAME]: lm-evaluation-harness "
                                     "benchmarks (mmlu, arc_easy, a local task YAML) before and after instead.")
    general_eval_limit: int | None = Field(None, ge=1, description="--general-eval tasks:...: at most this many "
                                           "documents per task (lm-eval's --limit); all when unset.")
    streaming: bool = Field(False, description="Read `data` as a stream (Hugging Face datasets, streaming=True): "
                            "records are shuffled in a buffer and tokenized as training goes, never held whole; "
                            "for files larger than memory. Needs max_steps; eval data comes from eval_data.")
    shuffle_buffer: int = Field(1000, ge=1, description="Streaming: records in the shuffle buffer (a buffer shuffle, "
                                "not a global permutation: larger mixes more, holds more); 1 keeps the file order.")
    max_length: int = Field(512, ge=2, description="Tokens per example (per block for pretraining).")
    max_image_pixels: int | None = Field(None, ge=1, description="Vision-language models: refuse (before training) "
                                         "any image of more than this many pixels (width x height), to bound memory.")
    tune_vision: bool = Field(False, description="Vision-language models: also train the vision tower (LoRA on its "
                              "linear layers, or its weights under full); default: the language model only.")
    tune_projector: bool = Field(False, description="Vision-language models: also train the connector / projector "
                                 "that maps image features into the language model.")
    max_length_policy: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What to do with longer examples; always counted and reported.")

    # -- optimisation ---------------------------------------------------------------------------------
    epochs: float = Field(1.0, gt=0, description="Passes over the data; max_steps, when set, wins.")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps to run (overrides epochs).")
    batch_size: int = Field(8, ge=1, description="Examples per optimiser step, over all ranks (micro_batch_size x "
                            "accumulation x ranks).")
    micro_batch_size: int | None = Field(None, ge=1, description="Examples per forward pass; default batch_size. "
                                         "Gradients accumulate over batch_size / micro_batch_size passes.")
    learning_rate: float | None = Field(None, gt=0, description="Peak LR; default: the method's own (LoRA 2e-4, full "
                                        "2e-5, soft prompts ~1e-2; see `tuneforge methods`).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps; default: warmup_ratio of the run.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0,
        description="Warm-up as a fraction of all steps (when warmup_steps unset).")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm (> 0); null disables clipping.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, "
                                         "~30% more time.")
    checkpoint_every: int = Field(1, ge=1, description="With gradient_checkpointing: recompute every Nth decoder "
                                  "block only (1: all; 2: half of them, less recomputation for more memory).")
    compile: bool = Field(False, description="torch.compile each decoder block (shapes dynamic, as packed batches "
                          "vary). The first steps compile (~1 min for SmolLM2 on 2 CPU cores), then each step runs "
                          "~1.2x faster there: pays on runs of hundreds of steps, not on the demo.")
    offload_activations: bool = Field(False, description="Keep the tensors saved for backward in (pinned) CPU memory "
                                      "instead of the GPU's: less GPU memory for host-device copies; pairs with "
                                      "gradient_checkpointing (then only each block's input moves).")
    tiled_mlp: int | Literal["auto"] | None = Field(
        None, description="Compute each block's MLP over N tiles of the sequence, recomputed tile by tile in backward "
        "(ALST's TiledMLP): the MLP's activation peak stops growing with the sequence, for one more MLP forward; "
        "auto: one tile per hidden_size tokens. Same losses and gradients as untiled.")
    rope_scaling: Literal["linear", "dynamic", "yarn"] | None = Field(
        None, description="Stretch the model's rotary positions to longer contexts (transformers' rope_type): linear "
        "(position interpolation), dynamic (NTK-aware, grows past the trained length) or yarn; with rope_factor.")
    rope_factor: float | None = Field(None, gt=1.0, description="With rope_scaling: how many times the trained "
                                      "context the model should read (4: a 4K model at 16K).")
    context_parallel: int = Field(1, ge=1, description="Under torchrun: split every sequence over N ranks (Ulysses "
                                  "all-to-all over heads; the heads must divide by N); the rest of the world is "
                                  "data parallel.")
    packing: bool | None = Field(None, description="Pack several examples into each row of max_length tokens, no "
                                 "padding, each example attending only to itself (the same losses as padded rows). "
                                 "Default: on wherever the method and objective allow it; true insists (an error "
                                 "where they do not), false pads.")
    seed: int = Field(0, description="Seeds data order, dropout and initialisation.")

    # -- evaluation, logging, checkpoints ------------------------------------------------------------
    output: str = Field("runs/demo", description="Run directory: adapter, config, metrics, checkpoints.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate the loss on eval data every N steps (and at end).")
    eval_before: bool = Field(True, description="Evaluate on the eval data once before the first step (logged as "
                              "step 0): the baseline for every later eval (reward, accuracy, loss).")
    eval_generate: bool = Field(True, description="At the start and end, generate answers for the eval data and "
                                "report exact match (SFT on chat data).")
    eval_max_new_tokens: int = Field(32, ge=1, description="Generation budget for the exact-match evaluation.")
    eval_limit: int | None = Field(None, ge=1, description="Use at most this many eval records for exact match.")
    log_every: int = Field(1, ge=1, description="Write metrics.jsonl every N steps.")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (atomic; resumable).")
    keep_checkpoints: int = Field(2, ge=1, description="How many step checkpoints to keep.")
    resume: bool = Field(False, description="Continue from the newest checkpoint in `output`.")
    overwrite: bool = Field(False, description="Allow training into an output directory that holds a finished run.")
    progress: bool = Field(True, description="Show a progress bar.")
    report_to: list[str] = Field(default_factory=list, description="Experiment trackers that also get every metric "
                                 "and this config: tensorboard, wandb, mlflow, trackio, comma-separated; none by "
                                 "default (pip install \"tuneforge[track]\").")

    @field_validator("data")
    @classmethod
    def _check_data_sources(cls, value: Any) -> Any:
        from .data.mixing import parse_sources

        parse_sources(value)  # a bad weight or a half-weighted mix fails here, before anything loads
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _check_trackers(cls, value: Any) -> list[str]:
        return tracker_names(value)  # "tensorboard,wandb", a list, or none; unknown names fail here

    @model_validator(mode="after")
    def _resolve_method_and_objective(self) -> "RunConfig":
        # Aliases become the one canonical name everything downstream sees; options are checked by building them.
        if self.batch_size % self.micro_batch:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch}")
        self._check_streaming()
        self._check_long_context()
        self.method = METHODS.get(self.method).name
        self.objective = OBJECTIVES.get(self.objective).name
        self.method_config()
        self.objective_config()
        return self

    def _check_streaming(self) -> None:
        if not self.streaming:
            return
        if self.data is None:
            raise ValueError("streaming reads `data`: give a data file (--data big.jsonl)")
        if self.max_steps is None:
            raise ValueError("streaming: the data's length is not known until it has been read; set max_steps "
                             "(epochs roll over when the stream ends)")
        if self.eval_split:
            raise ValueError("streaming: eval_split would have to read the whole file to hold records out; give "
                             "held-out records as eval_data instead")

    def _check_long_context(self) -> None:
        if (self.rope_scaling is None) != (self.rope_factor is None):
            raise ValueError("rope_scaling and rope_factor go together: --rope-scaling linear|dynamic|yarn "
                             "--rope-factor F")
        if isinstance(self.tiled_mlp, int) and self.tiled_mlp < 1:
            raise ValueError(f"tiled_mlp takes a number of tiles (>= 1) or auto, got {self.tiled_mlp}")

    @property
    def method_class(self) -> type[Method]:
        return METHODS.get(self.method)

    @property
    def objective_class(self) -> type[Objective]:
        return OBJECTIVES.get(self.objective)

    def method_config(self) -> MethodConfig:
        return self.method_class.config_class.from_dict(dict(self.method_options))

    def objective_config(self) -> ObjectiveConfig:
        run_level = {"max_length_policy": self.max_length_policy, "seed": self.seed}
        return self.objective_class.config_class.from_dict({**run_level, **self.objective_options})

    @property
    def distributed_strategy(self) -> str:
        """ddp or fsdp: the one set, else FSDP where the base weights train (their optimiser state is the
        memory to shard), DDP for adapter methods (small trainable state, no all-gather per layer)."""
        return self.distributed or ("fsdp" if self.method_class.trains_base_weights else "ddp")

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def accumulation_steps(self) -> int:
        if self.batch_size % self.micro_batch:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch}")
        return self.batch_size // self.micro_batch


def route_key(key: str, value: Any, out: dict[str, Any]) -> None:
    """Put ``key=value`` where it belongs: a RunConfig field, or a method's / objective's option by its prefix."""
    if not isinstance(key, str):
        raise ConfigError(f"config keys are names, got {key!r}")
    key = key.replace("-", "_")
    if key in ("method_options", "objective_options") and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping of option: value, got {type(value).__name__} {value!r}")
    if key in RunConfig.model_fields:
        out[key] = value
        return
    for section, registry in (("method_options", METHODS), ("objective_options", OBJECTIVES)):
        routed = registry.route(key)
        if routed is not None:
            out.setdefault(section, {})[routed[1]] = value
            return
    raise ConfigError(f"unknown config key {key!r}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (optional) and apply ``overrides`` (flags) on top; errors name the file and key."""
    values: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(path)
        for key, value in data.items():
            try:
                route_key(key, value, values)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    flags: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and key in ("method_options", "objective_options"):
            flags.setdefault(key, {}).update(value)
        else:
            route_key(key, value, flags)
    if "method" in flags and values.get("method") not in (None, flags["method"]):
        values["method_options"] = options_for_new_method(values.get("method_options", {}), flags["method"], source)
    for key, value in flags.items():
        if key in ("method_options", "objective_options"):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    try:
        return RunConfig(**values)
    except ValidationError as e:
        problems = "; ".join(describe_error(err) for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None


def describe_error(err: Any) -> str:
    """One pydantic error (its ``ErrorDetails`` dict) as ``field: message`` (a whole-config check has no field)."""
    message = err["msg"].removeprefix("Value error, ")
    where = ".".join(map(str, err["loc"]))
    return f"{where}: {message}" if where else message


def options_for_new_method(options: dict[str, Any], method: str, source: str) -> dict[str, Any]:
    """A flag switched the method: keep the file's method options the new method has (LoRA's r for QLoRA), and
    say which were left behind (the demo's LoRA rank means nothing to prompt tuning)."""
    known = set(option_names(METHODS.get(method).config_class))
    kept = {k: v for k, v in options.items() if k in known}
    dropped = sorted(set(options) - set(kept))
    if dropped:
        logging.getLogger(__name__).info("%s: method switched to %s; not using its options %s", source, method,
                                         ", ".join(dropped))
    return kept


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
