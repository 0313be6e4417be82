"""``tuneforge recommend``: estimate memory and time per method x objective for a model, and name the seeds'
combination that fits the user's situation, with the exact command or pipeline config to run.

The seeds' table of combinations by situation:

    no GPU / no budget                      -> SFT + QLoRA
    some resources                          -> SFT + LoRA
    a domain the model does not know        -> continued pretraining (with general data mixed in) + SFT
    must also be helpful and safe           -> SFT + DPO

The method is chosen by the table, not by a rule the table can contradict: every method is estimated at the setup
asked for (``tuneforge train``'s defaults where not given); then LoRA and QLoRA are tried as asked, with gradient
checkpointing, and with ever smaller micro-batches (the batch per step kept by accumulation) until each fits the
usable memory — the device's less ``HEADROOM``, printed, and the same number the table's "fits" column uses — and
the fastest of those is recommended, its row printed and its command exactly that configuration. On a GPU that is
usually LoRA, or QLoRA when LoRA needs checkpointing; on a CPU QLoRA saves nothing (it holds the float weights it
quantised and de-quantises every matmul), so its rows there say LoRA. A CPU is judged against its RAM (``--ram``,
default this machine's) and named impractical past a week per 1,000 steps. Full fine-tuning on a GPU is estimated
as it should be run, float32 weights, gradients and AdamW moments (16 bytes per parameter), and never recommended.

Where finished runs of the same model exist under ``--runs`` (a compare's, a sweep's), their measured peaks and
step times on this machine scale each method's estimates (``choose/measured.py``), and the table says "measured".

Memory is an analytic model of what training holds at its peak, with constants calibrated against measured peaks
(``bench/memory_calibration.py`` writes ``bench/results/memory_calibration_*.json``; the tests hold the estimates to
20% of them):

* weights: parameters x bytes per value (float32 on CPU, bf16 on GPU); QLoRA stores the decoder's linear weights
  in 4 bits (0.5 byte + its per-64 scale) and the rest as loaded;
* training state: an adapter's trainable tensors train in float32 (value, gradient, two AdamW moments: 16 bytes);
  full fine-tuning adds two moments in the weights' dtype (``fp32_master``: float32), and its gradients fill while
  backward frees the activations (the larger of the two counts); DPO/PPO of a full fine-tune keep a copy;
* activations saved for backward: per token and layer ``ACT_HIDDEN x hidden + ACT_MLP x intermediate`` values
  (``ACT_HIDDEN_FROZEN`` when nothing inside the blocks trains: prompt tuning), plus the logits (``vocab``
  values in the model's dtype, their float32 copy and its gradient; above ``FUSE_FROM_LOGITS`` the loss fuses the
  projection, and only one chunk of float32 logits and the hidden states' gradient remain); an objective's
  ``sequences_per_example`` multiplies the tokens (a preference pair: 2); gradient checkpointing keeps one hidden
  state per layer instead, and one block's activations while it is recomputed;
* per rank (``world_size``, ``strategy``): DDP ranks hold whole replicas; FSDP2 ranks hold 1/N of the parameters,
  gradients, optimiser state and reference copy, plus the units all-gathered at once (:func:`memory_breakdown`;
  ``tests/test_distributed.py`` checks the sharded terms against the shards two gloo ranks hold);
* on CPU the peak is the process's resident memory, which also holds the Python/PyTorch runtime (``CPU_RUNTIME_MB``)
  and, while the checkpoint loads, pages of the weight file (``CPU_LOAD_FACTOR``); QLoRA's also holds the float
  linear weights it quantised (``CPU_QLORA_SOURCE``, measured).

Time is compute over throughput: ~6 x parameters FLOPs per token for full fine-tuning (forward 2, backward 4),
~4 x for adapter methods (no weight gradients for the frozen base), a quantised base (``quantized_base``) x1.3 for
de-quantising, gradient checkpointing one more forward (2 x); throughput is a calibrated CPU figure or 35% of the
GPU's bf16 peak.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Calibrated on the embedded SmolLM2-135M (CPU, float32; bench/results/memory_calibration_cpu.json).
CPU_RUNTIME_MB = 520.0
CPU_LOAD_FACTOR = 1.0
CPU_QLORA_SOURCE = 1.0  # QLoRA's CPU peak also holds its float decoder linear weights (read before quantising)
ACT_HIDDEN, ACT_MLP = 18, 4
ACT_HIDDEN_FROZEN = 7  # no trainable tensor in the blocks: frozen linear layers need not keep their inputs
CPU_FLOPS = 30e9  # sustained float32 FLOP/s of a small multi-core CPU in training
GPU_BF16_FLOPS = {"h100": 990e12, "h200": 990e12, "a100": 312e12, "l4": 121e12, "a10": 125e12, "4090": 165e12,
                  "3090": 71e12, "t4": 65e12}
GPU_UTILISATION = 0.35
QLORA_BYTES = 0.5 + 4 / 64  # a 4-bit value and its share of one float32 scale per 64

SITUATIONS = {
    "task": "SFT on your task's examples",
    "domain": "continued pretraining on domain text (general data mixed in), then SFT",
    "alignment": "SFT, then DPO on preference pairs (helpful and safe)",
}


@dataclass
class ModelShape:
    name: str
    params: int
    decoder_linear_params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    trainable: dict[str, int]
    # Per method: trainable tensors inside the decoder blocks (LoRA, adapters, full) make backward keep every
    # linear layer's input; trained virtual tokens alone (prompt tuning) keep far fewer activations.
    in_blocks: dict[str, bool] = dataclasses.field(default_factory=dict)
    # Mixture-of-experts models: the routed experts' fused weights (every expert is resident in memory, but each
    # token runs only top_k of num_experts of them), and the parameters one token computes with.
    expert_params: int = 0
    active_params: int | None = None

    @property
    def params_per_token(self) -> int:
        """Parameters a token's forward multiplies through: all of a dense model, the active ones of an MoE."""
        return self.params if self.active_params is None else self.active_params

    @property
    def block_params(self) -> int:
        """Parameters of one decoder block: its linear weights, its routed experts and (Llama family) its two norms'
        weights."""
        return (self.decoder_linear_params + self.expert_params) // self.layers + 2 * self.hidden

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder blocks (embeddings, final norm, head): FSDP's root unit."""
        return self.params - self.layers * self.block_params


def model_shape(model_name: str, methods: tuple[str, ...] = ("full", "lora", "qlora", "prompt_tuning"),
                method_options: dict[str, dict] | None = None) -> ModelShape:
    """Parameter counts from the model's config alone (no weights read: a folder holding only config.json will
    do)."""
    from transformers import AutoConfig

    from ..models.loading import model_construction, read_model_config, resolve_model_path

    folder = Path(model_name).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        read_model_config(folder)  # a broken config: one line naming it; the weights are never needed here
        path: Path | str = folder
    else:
        path = resolve_model_path(model_name)
    with model_construction(path):
        config = AutoConfig.from_pretrained(path)
    return shape_from_config(config, model_name, methods, method_options)


def shape_from_config(config, name: str, methods: tuple[str, ...] = ("full", "lora", "qlora", "prompt_tuning"),
                      method_options: dict[str, dict] | None = None) -> ModelShape:
    """Parameter counts of the model ``config`` describes, built on the meta device (no memory, no download).
    ``method_options``: per method, the options its trainable count is taken with (e.g. ``{"qlora": {"r": 16}}``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..methods.base import METHODS, in_out_features, linear_like, output_embedding_names
    from ..models.loading import model_construction
    from ..options import option_names

    with model_construction(name), torch.device("meta"):  # a local folder's broken config: one line naming it
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    skip = output_embedding_names(model)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if linear_like(m) and n not in skip
                 and min(in_out_features(m)) > 0)
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)),
                 key=lambda m: sum(p.numel() for p in m.parameters()))
    trainable, in_blocks = {}, {}
    for method_name in methods:
        method = METHODS.get(method_name)
        if method.trains_base_weights:
            trainable[method_name], in_blocks[method_name] = params, True
            continue
        counted = method.float_base_method()  # QLoRA's adapter is LoRA's; a meta model cannot be quantised
        attached = copy.deepcopy(model)
        known = set(option_names(counted.config_class))
        options = {k: v for k, v in (method_options or {}).get(method_name, {}).items() if k in known}
        handle = counted.attach(attached, counted.config_class.from_dict(options))
        trainable[method_name] = handle.num_trainable_parameters()
        block_ids = {id(p) for m in attached.modules() if isinstance(m, torch.nn.ModuleList)
                     and len(m) == len(blocks) for p in m.parameters()}
        in_blocks[method_name] = any(id(p) in block_ids for _, p in handle.trainable_parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts, active = expert_counts(model, params)
    return ModelShape(name, params, linear, text.hidden_size, getattr(text, "intermediate_size", 4 *
                      text.hidden_size), text.num_hidden_layers, text.vocab_size, trainable, in_blocks,
                      expert_params=experts, active_params=active)


def expert_counts(model, params: int) -> tuple[int, int | None]:
    """(routed experts' parameters, parameters active per token) of an MoE model; (0, None) for a dense one. A
    token runs ``top_k`` of the ``num_experts`` experts of each MoE layer (shared experts and dense layers always)."""
    from ..models.moe import find_experts

    names = find_experts(model)
    if not names:
        return 0, None
    experts = inactive = 0
    top_k = model.config.get_text_config().num_experts_per_tok
    for name in names:
        module = model.get_submodule(name)
        size = sum(p.numel() for p in module.parameters())
        experts += size
        inactive += size * (module.num_experts - min(top_k, module.num_experts)) // module.num_experts
    return experts, params - inactive


def memory_breakdown(shape: ModelShape, method: str, objective: str = "sft", *, gpu: bool = False,
                     batch_size: int = 4, max_length: int = 512, gradient_checkpointing: bool = False,
                     world_size: int = 1, strategy: str | None = None, fp32_master: bool = False,
                     compute_bytes: int | None = None) -> dict[str, float]:
    """What one device (one rank) holds at the training peak, per component, in MB; the values sum to the peak.

    ``batch_size`` is the micro-batch this device runs in one forward. ``strategy``: None (one process), ``"ddp"``
    (every rank holds a whole replica: the one-device figures; DDP's gradient buckets, one more copy of the trainable
    gradients, are left out since tuneforge runs DDP for adapters, whose gradients are small) or ``"fsdp"`` (FSDP2
    ``fully_shard`` per decoder block, then the root): parameters, gradients, optimiser state and the frozen
    reference copy are sharded, 1/``world_size`` each per rank, and a rank also holds what is all-gathered at once:
    the root unit (embeddings, final norm, head; the root keeps its parameters from forward into backward), two
    blocks (the one computing and the one prefetched) and, for trained base weights, the unsharded gradients of the
    root and of one block in the compute dtype, plus the block's float32 copy a GPU run reduce-scatters.
    ``fp32_master`` (full fine-tuning on a GPU): weights, gradients and AdamW moments kept in float32 per shard and
    all-gathered to bf16 for compute (FSDP's MixedPrecisionPolicy over a float32-loaded model); otherwise they are
    all in the weights' dtype (tuneforge's default: the model loads in bf16 on a GPU). ``compute_bytes``: bytes of
    one activation value, default the loaded dtype's (2 on a GPU, 4 on a CPU); 4 with ``fp32_master`` on one GPU is
    ``--dtype float32``: 16 bytes per parameter of weights, gradients and moments, activations in float32.

    On CPU the peak is a process's resident memory: the runtime and load terms are added (one per rank); under FSDP
    a rank's peak may instead come while it still holds the whole loaded model, before sharding.
    """
    from ..methods.base import METHODS
    from ..objectives.base import OBJECTIVES
    from ..models.linear_cross_entropy import CHUNK_BYTES
    from ..models.logprobs import FUSE_FROM_LOGITS

    if strategy not in (None, "ddp", "fsdp"):
        raise ValueError(f"strategy must be None, 'ddp' or 'fsdp', got {strategy!r}")
    if world_size < 1 or (strategy is None and world_size != 1):
        raise ValueError(f"world_size must be >= 1 (and 1 without a strategy), got {world_size}")
    m = METHODS.get(method)
    value_bytes = compute_bytes or (2 if gpu else 4)
    full, qlora = m.trains_base_weights, m.quantized_base
    shards = world_size if strategy == "fsdp" else 1
    # Full fine-tuning trains the weights in their storage dtype; adapters train in float32 (as PEFT's autocast).
    state_bytes = (4 if fp32_master else value_bytes) if full else 4
    if qlora:
        rest = shape.params - shape.decoder_linear_params  # embeddings, norms, head, fused experts: as loaded
        weights = shape.decoder_linear_params * QLORA_BYTES + rest * value_bytes
    else:
        weights = shape.params * (state_bytes if full else value_bytes)
    trainable = shape.trainable[m.name]
    adapter_values = 0 if full else trainable * 4
    objective_class = OBJECTIVES.get(objective)
    parts = {
        "parameters": (weights + adapter_values) / shards,
        "gradients": trainable * state_bytes / shards,
        "optimizer": 2 * trainable * state_bytes / shards,  # AdamW's two moments
        "reference": weights / shards if full and objective_class.needs_reference else 0.0,  # DPO/PPO's frozen copy
        "gathered": _gathered_bytes(shape, full, qlora, value_bytes, gpu) if strategy == "fsdp" else 0.0,
    }
    tokens = batch_size * max_length * objective_class.sequences_per_example  # a pair: chosen and rejected rows
    act_hidden = ACT_HIDDEN if shape.in_blocks.get(m.name, True) else ACT_HIDDEN_FROZEN
    block_activations = act_hidden * shape.hidden + ACT_MLP * shape.intermediate
    if gradient_checkpointing:  # one hidden state per layer, and one block's activations while it is recomputed
        per_token = (shape.layers * shape.hidden + block_activations) * value_bytes
    else:
        per_token = shape.layers * block_activations * value_bytes
    parts["activations"] = tokens * per_token
    if objective_class.online or tokens * shape.vocab < FUSE_FROM_LOGITS:
        parts["logits"] = tokens * shape.vocab * (value_bytes + 8)  # model dtype, float32 copy and its gradient
    else:  # the projection fused with the loss: one float32 chunk of logits, and the hidden states' gradient
        parts["logits"] = CHUNK_BYTES + tokens * shape.hidden * 4
    if full:  # backward frees activations as it fills the weight gradients: the larger of the two is the peak
        parts["freed_in_backward"] = -min(parts["activations"] + parts["logits"], parts["gradients"])
    if not gpu:
        parts["runtime"] = weights * (CPU_LOAD_FACTOR - 1) + CPU_RUNTIME_MB * 2**20
        if qlora:  # measured: the float linear weights the 4-bit ones came from
            parts["runtime"] += shape.decoder_linear_params * value_bytes * CPU_QLORA_SOURCE
    return {name: value / 2**20 for name, value in parts.items()}


def _gathered_bytes(shape: ModelShape, full: bool, qlora: bool, value_bytes: int, gpu: bool) -> float:
    """FSDP2's unsharded tensors at the peak: the root unit's and two blocks' parameters in the compute dtype (a
    QLoRA block is all-gathered packed, 4-bit), and for trained weights the root's and one block's gradients (the
    block's also in float32 on a GPU)."""
    block_linear = shape.decoder_linear_params // shape.layers
    block = block_linear * QLORA_BYTES + (shape.block_params - block_linear) * value_bytes if qlora else \
        shape.block_params * value_bytes
    gathered = shape.root_params * value_bytes + 2 * block
    if full:  # the head's gradient comes first in backward and stays unsharded until the root's reduce-scatter
        gathered += (shape.root_params + shape.block_params) * value_bytes
        if gpu:  # a GPU run reduce-scatters a block's gradients in float32 (reduce_dtype): a copy beside the bf16
            gathered += shape.block_params * 4  # (the root's float32 copy comes last, its activations freed)
    return gathered


def estimate_memory_mb(shape: ModelShape, method: str, objective: str = "sft", *, gpu: bool = False,
                       batch_size: int = 4, max_length: int = 512, gradient_checkpointing: bool = False,
                       world_size: int = 1, strategy: str | None = None, fp32_master: bool = False,
                       compute_bytes: int | None = None) -> float:
    """Peak training memory of one device in MB (CUDA allocated on GPU, process resident memory on CPU): the sum
    of :func:`memory_breakdown`."""
    return sum(memory_breakdown(shape, method, objective, gpu=gpu, batch_size=batch_size, max_length=max_length,
                                gradient_checkpointing=gradient_checkpointing, world_size=world_size,
                                strategy=strategy, fp32_master=fp32_master, compute_bytes=compute_bytes).values())


def estimate_step_seconds(shape: ModelShape, method: str, *, gpu: str | None = None, batch_size: int = 4,
                          max_length: int = 512, gradient_checkpointing: bool = False) -> float:
    """Seconds per optimiser step of ``batch_size`` examples of ``max_length`` tokens (FLOPs over throughput)."""
    from ..methods.base import METHODS

    m = METHODS.get(method)
    # An MoE token multiplies through its active parameters only (its top-k experts).
    flops_per_token = (6 if m.trains_base_weights else 4) * shape.params_per_token * (1.3 if m.quantized_base else 1.0)
    if gradient_checkpointing:  # the forward (2 x parameters per token) runs again in backward
        flops_per_token += 2 * shape.params_per_token * (1.3 if m.quantized_base else 1.0)
    if gpu is not None and gpu not in GPU_BF16_FLOPS:
        raise ValueError(f"no throughput known for GPU {gpu!r}; known GPUs: {', '.join(GPU_BF16_FLOPS)}")
    throughput = CPU_FLOPS if gpu is None else GPU_BF16_FLOPS[gpu] * GPU_UTILISATION
    return batch_size * max_length * flops_per_token / throughput


def parse_memory(text: str, flag: str = "--gpu-memory") -> float:
    """``24GB``, ``24 GiB``, ``80g``, ``16000MB`` -> MB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([gm])?i?b?\s*", text.lower())
    if not match or float(match.group(1)) == 0:
        raise ValueError(f"{flag}: expected a size such as 24GB or 16000MB, got {text!r}")
    value = float(match.group(1))
    return value * 1024 if match.group(2) in (None, "g") else value


STAGE_WORDS = {"pretrain": "continued pretraining"}  # how a situation's stage reads in the verdict (else SFT, DPO)
HEADROOM = 0.10  # of the device's memory kept free: CUDA context, allocator fragmentation (shown, never hidden)
CANDIDATES = ("lora", "qlora")  # the seeds' recommendations; full fine-tuning never is (forgetting, for its memory)
IMPRACTICAL_HOURS = 7 * 24  # per 1,000 optimiser steps: past a week, a CPU is not where to train this model
NOMINAL_GPU = "h100"  # orders configurations by time when the GPU is not named (the ratios do not depend on it)


@dataclass(frozen=True)
class Setup:
    """What one ``tuneforge train`` command runs, as far as memory and time go."""

    batch_size: int  # examples per optimiser step (train's --batch-size)
    micro_batch_size: int  # examples per forward pass; gradients accumulate over batch_size / micro_batch_size
    max_length: int
    gradient_checkpointing: bool = False

    def flags(self) -> list[str]:
        out = ["--batch-size", str(self.batch_size), "--max-length", str(self.max_length)]
        if self.micro_batch_size != self.batch_size:
            out += ["--micro-batch-size", str(self.micro_batch_size)]
        if self.gradient_checkpointing:
            out += ["--gradient-checkpointing", "true"]
        return out

    def keys(self) -> dict[str, Any]:
        """The same settings as pipeline-config keys."""
        out: dict[str, Any] = {"batch_size": self.batch_size, "max_length": self.max_length}
        if self.micro_batch_size != self.batch_size:
            out["micro_batch_size"] = self.micro_batch_size
        if self.gradient_checkpointing:
            out["gradient_checkpointing"] = True
        return out

    def describe(self) -> str:
        micro = f" (micro-batch {self.micro_batch_size})" if self.micro_batch_size != self.batch_size else ""
        return (f"batch {self.batch_size}{micro} x {self.max_length} tokens"
                + (", gradient checkpointing" if self.gradient_checkpointing else ""))


def train_defaults() -> tuple[int, int]:
    """``tuneforge train``'s batch size and max length: what a command without those flags runs."""
    from ..config import RunConfig

    fields = RunConfig.model_fields
    return fields["batch_size"].default, fields["max_length"].default


def ladder(setup: Setup) -> list[Setup]:
    """The setup as asked, then with gradient checkpointing, then ever smaller micro-batches (same batch per step,
    by accumulation): each uses less memory than the one before, and the first that fits is the one to run."""
    out = [setup, dataclasses.replace(setup, gradient_checkpointing=True)]
    micro = setup.micro_batch_size
    while micro > 1:
        micro = max(d for d in range(1, micro) if setup.batch_size % d == 0)  # a divisor: exact accumulation
        out.append(dataclasses.replace(setup, micro_batch_size=micro, gradient_checkpointing=True))
    return list(dict.fromkeys(out))


def check_request(goal: str, batch_size: int | None, max_length: int | None, gpu_name: str | None,
                  micro_batch_size: int | None = None) -> None:
    """Refuse what no estimate can mean (a batch of -5 gives negative memory), before the model's config is read."""
    if goal not in SITUATIONS:
        raise ValueError(f"--goal must be one of {', '.join(SITUATIONS)}, got {goal!r}")
    for flag, value in (("--batch-size", batch_size), ("--max-length", max_length),
                        ("--micro-batch-size", micro_batch_size)):
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    batch = batch_size or (train_defaults()[0] if micro_batch_size else None)
    if micro_batch_size and batch and batch % micro_batch_size:
        raise ValueError(f"--batch-size {batch} is not a multiple of --micro-batch-size {micro_batch_size}")
    if gpu_name is not None and gpu_name not in GPU_BF16_FLOPS:  # its throughput would be a guess
        raise ValueError(f"--gpu: no throughput known for {gpu_name!r}; known GPUs: {', '.join(GPU_BF16_FLOPS)}")


@dataclass
class Estimator:
    """Memory and time of one method x objective x setup on the device asked about: the analytic model, scaled by
    what runs on this machine measured (``calibrations``) where there are any."""

    shape: ModelShape
    gpu: bool
    gpu_name: str | None = None
    calibrations: dict[str, Any] = dataclasses.field(default_factory=dict)

    def memory_mb(self, method: str, objective: str, setup: Setup) -> float:
        return self.model_memory_mb(method, objective, setup) * self._ratio(method, "memory")

    def model_memory_mb(self, method: str, objective: str, setup: Setup) -> float:
        from ..methods.base import METHODS

        # Full fine-tuning on a GPU, honestly: float32 weights, gradients and AdamW moments (16 bytes/parameter,
        # `--dtype float32`); bf16 AdamW would hold half as much but rounds small updates away.
        honest = self.gpu and METHODS.get(method).trains_base_weights
        return estimate_memory_mb(self.shape, method, objective, gpu=self.gpu, batch_size=setup.micro_batch_size,
                                  max_length=setup.max_length, gradient_checkpointing=setup.gradient_checkpointing,
                                  fp32_master=honest, compute_bytes=4 if honest else None)

    def step_s(self, method: str, setup: Setup) -> float:
        return self.model_step_s(method, setup) * self._ratio(method, "time")

    def model_step_s(self, method: str, setup: Setup) -> float:
        gpu_name = (self.gpu_name or NOMINAL_GPU) if self.gpu else None
        return estimate_step_seconds(self.shape, method, gpu=gpu_name, batch_size=setup.batch_size,
                                     max_length=setup.max_length, gradient_checkpointing=setup.gradient_checkpointing)

    @property
    def times_known(self) -> bool:
        """A GPU's step time needs its name (or a measured run); a CPU's is the calibrated CPU figure."""
        return not self.gpu or self.gpu_name is not None or any(c.time for c in self.calibrations.values())

    def basis(self, method: str) -> str:
        return "measured" if method in self.calibrations else "estimate"

    def _ratio(self, method: str, kind: str) -> float:
        own = self.calibrations.get(method)
        if own is not None and getattr(own, kind):
            return getattr(own, kind)
        if kind == "time":  # this machine's throughput, from whichever methods it measured
            ratios = sorted(c.time for c in self.calibrations.values() if c.time)
            return ratios[len(ratios) // 2] if ratios else 1.0
        return 1.0


def recommend(shape: ModelShape, goal: str = "task", gpu_memory_mb: float | None = None, *,
              batch_size: int | None = None, max_length: int | None = None, micro_batch_size: int | None = None,
              gpu_name: str | None = None, ram_mb: float | None = None,
              calibrations: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seeds' combination for ``goal`` on this hardware, the estimates behind it and exactly what to run.

    ``gpu_memory_mb`` None: a CPU, whose budget is ``ram_mb`` (unknown: nothing is said to fit or not). Every
    method is estimated at the setup asked for (train's defaults where not given); for LoRA and QLoRA the setup is
    then relaxed step by step (:func:`ladder`) and the fastest configuration that fits in the usable memory (the
    device's less ``HEADROOM``) is the recommendation; its row is in the table, and the command is that
    configuration."""
    default_batch, default_length = train_defaults()
    check_request(goal, batch_size, max_length, gpu_name, micro_batch_size)
    batch = batch_size or default_batch
    asked = Setup(batch, micro_batch_size or batch, max_length or default_length)
    gpu = gpu_memory_mb is not None
    device_mb = gpu_memory_mb if gpu else ram_mb
    usable = device_mb * (1 - HEADROOM) if device_mb else None
    est = Estimator(shape, gpu, gpu_name, calibrations or {})
    objectives = {"task": ["sft"], "domain": ["pretrain", "sft"], "alignment": ["sft", "dpo"]}[goal]

    def row(method: str, setup: Setup) -> dict[str, Any]:
        memory = max(est.memory_mb(method, o, setup) for o in objectives)  # one setup serves every stage
        return {"method": method, "setup": setup, "trainable": shape.trainable[method], "memory_mb": round(memory),
                "step_s": est.step_s(method, setup), "fits": None if usable is None else memory <= usable,
                "basis": est.basis(method)}

    table = [row(m, asked) for m in shape.trainable]
    tried, fitting = [], []
    for method in (m for m in CANDIDATES if m in shape.trainable):
        for setup in ladder(asked):  # up to the first that fits: later steps only cost more time, or as much
            tried.append(row(method, setup))
            if tried[-1]["fits"] is not False:
                fitting.append(tried[-1])
                break
    chosen = min(fitting, key=lambda r: r["step_s"]) if fitting else None  # ties: LoRA, the seeds' first choice
    result = {"goal": goal, "objectives": objectives, "asked": asked, "usable_mb": usable, "device_mb": device_mb,
              "gpu": gpu, "estimates": table, "tried": tried, "times_known": est.times_known,
              "notes": _notes(shape, est, asked, gpu)}
    if chosen is None:
        frugal = min(tried, key=lambda r: r["memory_mb"])
        result.update(method=None, setup=None, run=None, combination="nothing fits",
                      why=f"even {frugal['method']} with {frugal['setup'].describe()} needs {frugal['memory_mb']:,} "
                          f"MB, more than the {usable:,.0f} MB usable: shorten --max-length, or use a device with "
                          "more memory")
        _impractical(result, frugal, gpu)
        return result
    method, setup = chosen["method"], chosen["setup"]
    result.update(method=method, setup=setup, chosen=chosen, run=command(shape.name, method, goal, setup),
                  combination=" + ".join(STAGE_WORDS.get(o, o.upper()) for o in objectives) + f" with {method}",
                  why=_why(chosen, tried, usable, table))
    _impractical(result, chosen, gpu)
    return result


def _impractical(result: dict[str, Any], row: dict[str, Any], gpu: bool) -> None:
    """A CPU run that would take more than a week per 1,000 steps is named impractical, with where to go instead."""
    hours = row["step_s"] * 1000 / 3600
    if not gpu and hours > IMPRACTICAL_HOURS:
        result["impractical"] = (f"impractical on a CPU: {row['method']} would take about {hours / 24:,.0f} days "
                                 f"per 1,000 steps of {row['setup'].describe()}; train this model on a GPU "
                                 "(see: tuneforge recommend --gpu-memory 24GB)")


def _why(chosen: dict[str, Any], tried: list[dict[str, Any]], usable: float | None,
         table: list[dict[str, Any]]) -> str:
    """The reason in the table's own numbers."""
    where = f"the {usable:,.0f} MB usable" if usable else "memory (unknown: give --ram)"
    first = tried[0]
    if chosen is first:
        reason = f"{chosen['method']} as asked fits {where} and is the fastest that does"
    else:
        reason = (f"the fastest configuration that fits {where}: {chosen['memory_mb']:,} MB, "
                  f"{chosen['step_s']:.3g} s/step")
    rows = {r["method"]: r for r in table}
    other = next((rows[m] for m in CANDIDATES if m != chosen["method"] and m in rows), None)
    if other is not None and other["memory_mb"] >= rows[chosen["method"]]["memory_mb"] and \
            other["step_s"] >= rows[chosen["method"]]["step_s"]:
        reason += f"; {other['method']} saves no memory here and is slower (its row above)"
    return reason


def _notes(shape: ModelShape, est: Estimator, asked: Setup, gpu: bool) -> list[str]:
    from ..methods.base import METHODS

    notes = []
    full = [m for m in shape.trainable if METHODS.get(m).trains_base_weights]
    if full and gpu:
        notes.append(f"{full[0]}: float32 weights, gradients and two AdamW moments, 16 bytes per parameter "
                     f"({shape.params * 16 / 2**30:,.1f} GiB before activations; run with --dtype float32). "
                     "bf16 weights with bf16 AdamW hold half that but round small updates away")
    elif full:
        notes.append(f"{full[0]}: float32 weights, gradients and two AdamW moments, 16 bytes per parameter")
    if not est.times_known:
        notes.append("s/step: give --gpu NAME (h100, a100, 4090, ...) for time estimates; configurations are still "
                     "ordered by their compute")
    for method, c in est.calibrations.items():
        time = f" and step time {c.time:.2f}x" if c.time else ""
        notes.append(f"measured on this machine: {method} ({c.runs} run(s)): peak {c.memory:.2f}x{time} the "
                     "model's estimate at the same setups; its rows are scaled by that (basis: measured)")
    return notes


def command(model: str, method: str, goal: str, setup: Setup | None = None) -> str:
    """The command (one stage) or the pipeline config (several stages) that runs exactly ``setup``."""
    if setup is None:
        batch, length = train_defaults()
        setup = Setup(batch, batch, length)
    if goal == "task":
        return " ".join(["tuneforge train --model", model, "--method", method, "--objective sft --data "
                         "YOUR_TASK.jsonl", *setup.flags()])
    stages = {"domain": [("pretrain", "pretrain", "[YOUR_DOMAIN_TEXT.jsonl:0.8, general:0.2]"),
                         ("sft", "sft", "YOUR_TASK.jsonl")],
              "alignment": [("sft", "sft", "YOUR_TASK.jsonl"), ("dpo", "dpo", "YOUR_PAIRS.jsonl")]}[goal]
    lines = ["# pipeline.yaml — run with: tuneforge train pipeline.yaml", f"model: {model}", f"method: {method}",
             *(f"{key}: {str(value).lower() if isinstance(value, bool) else value}"
               for key, value in setup.keys().items()), f"output: runs/{goal}", "stages:"]
    for name, objective, data in stages:
        lines += [f"  - name: {name}", f"    objective: {objective}", f"    data: {data}"]
    return "\n".join(lines)


def format_report(result: dict[str, Any], shape: ModelShape, hardware: str) -> str:
    usable = result["usable_mb"]
    budget = (f"{usable:,.0f} MB usable of {result['device_mb']:,.0f} MB ({HEADROOM:.0%} kept free for the "
              f"{'CUDA context and allocator' if result['gpu'] else 'system and other processes'})" if usable
              else "memory unknown (give --ram): nothing is judged to fit or not")
    active = "" if shape.active_params is None else f", {shape.active_params:,} active per token"
    lines = [f"model: {shape.name} ({shape.params:,} parameters{active}), {hardware}: {budget}",
             f"asked: {result['asked'].describe()}", "", *_table(result["estimates"], result["times_known"])]
    if result["tried"]:
        lines += ["", "configurations tried, per method until one fits (gradient checkpointing first, then smaller "
                  "micro-batches; the batch per step stays):", *_table(result["tried"], result["times_known"],
                                                                       with_setup=True)]
    lines += [""] + [f"note: {n}" for n in result["notes"]] if result["notes"] else []
    lines += ["", f"situation: {SITUATIONS[result['goal']]}"]
    if result["method"] is None:
        lines += [f"recommended: nothing fits — {result['why']}"]
        lines += [f"warning: {result['impractical']}"] if result.get("impractical") else []
        lines += ["", "run: nothing on this device"]
        return "\n".join(lines)
    lines += [f"recommended: {result['combination']}, {result['setup'].describe()} — {result['why']}"]
    if result.get("impractical"):
        lines += [f"warning: {result['impractical']}"]
    lines += ["", "run:", result["run"]]
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]], times_known: bool, with_setup: bool = False) -> list[str]:
    width = max(len(r["setup"].describe()) for r in rows) + 2
    head = f"{'method':<15}" + (f"{'setup':<{width}}" if with_setup else f"{'trainable':>14}") + \
        f"{'peak memory':>14}{'s/step':>10}{'fits':>6}  basis"
    lines = [head]
    for r in rows:
        middle = f"{r['setup'].describe():<{width}}" if with_setup else f"{r['trainable']:>14,}"
        fits = "" if r["fits"] is None else "yes" if r["fits"] else "no"
        step = f"{_seconds(r['step_s']):>10}" if times_known else f"{'?':>10}"
        lines.append(f"{r['method']:<15}{middle}{r['memory_mb']:>11,} MB{step}{fits:>6}  {r['basis']}")
    return lines


def _seconds(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def system_ram_mb() -> float | None:
    """This machine's physical memory in MB (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


def measured_calibrations(shape: ModelShape, model: str, runs_root: str | Path, gpu: bool,
                          gpu_name: str | None) -> dict[str, Any]:
    """Per method, measured over estimated peak and step time from the finished runs of ``model`` under
    ``runs_root`` on this kind of device (``choose/measured.py``)."""
    from ..models.loading import resolve_model_reference
    from .measured import calibrations, runs_of_model

    runs = [r for r in runs_of_model(Path(runs_root), resolve_model_reference(model), resolve_model_reference)
            if r.method in shape.trainable]
    if not runs:
        return {}
    est = Estimator(shape, gpu, gpu_name)

    def setup_of(run) -> Setup:
        return Setup(run.batch_size, run.micro_batch, run.max_length, run.gradient_checkpointing)

    return calibrations(runs, gpu, lambda r: est.model_memory_mb(r.method, r.objective, setup_of(r)),
                        lambda r: est.model_step_s(r.method, setup_of(r)))


def model_heads(model: str | None) -> int | None:
    """The attention heads of ``model``'s config (context parallelism splits them), None when unknown."""
    from transformers import AutoConfig

    from ..models.loading import DEFAULT_MODEL, resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model or DEFAULT_MODEL))
    return getattr(getattr(config, "text_config", config), "num_attention_heads", None)


__all__ = ["model_shape", "shape_from_config", "memory_breakdown", "estimate_memory_mb", "estimate_step_seconds",
           "recommend", "ModelShape", "Setup", "command"]
