"""``tuneforge recommend``: estimate memory and time per method x objective for a model, and name the seeds'
combination that fits the user's situation, with the exact command or pipeline config to run.

The seeds' table of combinations by situation:

    no GPU / no budget                      -> SFT + QLoRA
    some resources                          -> SFT + LoRA
    a domain the model does not know        -> continued pretraining (with general data mixed in) + SFT
    must also be helpful and safe           -> SFT + DPO

Memory is an analytic model of what training holds at its peak, with constants calibrated against measured peaks
(``bench/memory_calibration.py`` writes ``bench/results/memory_calibration_*.json``; the tests hold the estimates to
20% of them):

* weights: parameters x bytes per value (float32 on CPU, bf16 on GPU); QLoRA stores the decoder's linear weights
  in 4 bits (0.5 byte + its per-64 scale) and the rest as loaded;
* training state: an adapter's trainable tensors train in float32 (value, gradient, two AdamW moments: 16 bytes);
  full fine-tuning adds two moments in the weights' dtype, and its gradients fill while backward frees the
  activations (the larger of the two counts); DPO/PPO of a full fine-tune keep a copy;
* activations saved for backward: per token and layer ``ACT_HIDDEN x hidden + ACT_MLP x intermediate`` values
  (``ACT_HIDDEN_FROZEN`` when nothing inside the blocks trains: prompt tuning), plus the logits (``vocab``
  values in the model's dtype, their float32 copy and its gradient; above ``FUSE_FROM_LOGITS`` the loss fuses the
  projection, and only one chunk of float32 logits and the hidden states' gradient remain); pairs double the
  tokens; gradient checkpointing keeps one hidden state per layer instead, and one block's activations while it
  is recomputed;
* per rank (``world_size``, ``strategy``): DDP ranks hold whole replicas; FSDP2 ranks hold 1/N of the parameters,
  gradients, optimiser state and reference copy, plus the units all-gathered at once (:func:`memory_breakdown`;
  ``tests/test_distributed.py`` checks the sharded terms against the shards two gloo ranks hold);
* on CPU the peak is the process's resident memory, which also holds the Python/PyTorch runtime (``CPU_RUNTIME_MB``)
  and, while the checkpoint loads, pages of the weight file (``CPU_LOAD_FACTOR``); QLoRA's also holds the float
  linear weights it quantised (``CPU_QLORA_SOURCE``, measured).

Time is compute over throughput: ~6 x parameters FLOPs per token for full fine-tuning (forward 2, backward 4),
~4 x for adapter methods (no weight gradients for the frozen base), QLoRA x1.3 for de-quantising; throughput is a
calibrated CPU figure or 35% of the GPU's bf16 peak.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import re
from dataclasses import dataclass
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

    @property
    def block_params(self) -> int:
        """Parameters of one decoder block: its linear weights and (Llama family) its two norms' weights."""
        return self.decoder_linear_params // self.layers + 2 * self.hidden

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder blocks (embeddings, final norm, head): FSDP's root unit."""
        return self.params - self.layers * self.block_params


def model_shape(model_name: str, methods: tuple[str, ...] = ("full", "lora", "qlora", "prompt_tuning"),
                method_options: dict[str, dict] | None = None) -> ModelShape:
    """Parameter counts from the model's config alone (no weights read)."""
    from transformers import AutoConfig

    from ..models.loading import model_construction, resolve_model_path

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
        counted = METHODS.get("lora") if method_name == "qlora" else method  # the same adapter, over a 4-bit base
        attached = copy.deepcopy(model)
        options = (method_options or {}).get(method_name, {})
        handle = counted.attach(attached, counted.config_class.from_dict(dict(options)))
        trainable[method_name] = handle.num_trainable_parameters()
        block_ids = {id(p) for m in attached.modules() if isinstance(m, torch.nn.ModuleList)
                     and len(m) == len(blocks) for p in m.parameters()}
        in_blocks[method_name] = any(id(p) in block_ids for _, p in handle.trainable_parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(name, params, linear, text.hidden_size, getattr(text, "intermediate_size", 4 *
                      text.hidden_size), text.num_hidden_layers, text.vocab_size, trainable, in_blocks)


def memory_breakdown(shape: ModelShape, method: str, objective: str = "sft", *, gpu: bool = False,
                     batch_size: int = 4, max_length: int = 512, gradient_checkpointing: bool = False,
                     world_size: int = 1, strategy: str | None = None, fp32_master: bool = False) -> dict[str, float]:
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
    all in the weights' dtype (tuneforge's default: the model loads in bf16 on a GPU).

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
    value_bytes = 2 if gpu else 4
    full, qlora = m.trains_base_weights, m.name == "qlora"
    shards = world_size if strategy == "fsdp" else 1
    # Full fine-tuning trains the weights in their storage dtype; adapters train in float32 (as PEFT's autocast).
    state_bytes = (4 if fp32_master else value_bytes) if full else 4
    if qlora:
        rest = shape.params - shape.decoder_linear_params  # embeddings, norms, the head: as loaded
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
    tokens = batch_size * max_length * (2 if objective_class.name in ("dpo", "reward", "orpo", "simpo") else 1)
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
                       world_size: int = 1, strategy: str | None = None, fp32_master: bool = False) -> float:
    """Peak training memory of one device in MB (CUDA allocated on GPU, process resident memory on CPU): the sum
    of :func:`memory_breakdown`."""
    return sum(memory_breakdown(shape, method, objective, gpu=gpu, batch_size=batch_size, max_length=max_length,
                                gradient_checkpointing=gradient_checkpointing, world_size=world_size,
                                strategy=strategy, fp32_master=fp32_master).values())


def estimate_step_seconds(shape: ModelShape, method: str, *, gpu: str | None = None, batch_size: int = 4,
                          max_length: int = 512) -> float:
    from ..methods.base import METHODS

    m = METHODS.get(method)
    flops_per_token = (6 if m.trains_base_weights else 4) * shape.params * (1.3 if m.name == "qlora" else 1.0)
    if gpu is not None and gpu not in GPU_BF16_FLOPS:
        raise ValueError(f"no throughput known for GPU {gpu!r}; known GPUs: {', '.join(GPU_BF16_FLOPS)}")
    throughput = CPU_FLOPS if gpu is None else GPU_BF16_FLOPS[gpu] * GPU_UTILISATION
    return batch_size * max_length * flops_per_token / throughput


def parse_memory(text: str) -> float:
    """``24GB``, ``24 GiB``, ``80g``, ``16000MB`` -> MB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([gm])?i?b?\s*", text.lower())
    if not match or float(match.group(1)) == 0:
        raise ValueError(f"--gpu-memory: expected a size such as 24GB or 16000MB, got {text!r}")
    value = float(match.group(1))
    return value * 1024 if match.group(2) in (None, "g") else value


def check_request(goal: str, batch_size: int, max_length: int, gpu_name: str | None) -> None:
    """Refuse what no estimate can mean (a batch of -5 gives negative memory), before the model's config is read."""
    if goal not in SITUATIONS:
        raise ValueError(f"--goal must be one of {', '.join(SITUATIONS)}, got {goal!r}")
    for flag, value in (("--batch-size", batch_size), ("--max-length", max_length)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    if gpu_name is not None and gpu_name not in GPU_BF16_FLOPS:  # its throughput would be a guess
        raise ValueError(f"--gpu: no throughput known for {gpu_name!r}; known GPUs: {', '.join(GPU_BF16_FLOPS)}")


def recommend(shape: ModelShape, goal: str = "task", gpu_memory_mb: float | None = None, *, batch_size: int = 4,
              max_length: int = 512, gpu_name: str | None = None) -> dict[str, Any]:
    """The seeds' combination for ``goal`` on this hardware, the estimates behind it and what to run."""
    check_request(goal, batch_size, max_length, gpu_name)
    gpu = gpu_memory_mb is not None
    objectives = {"task": ["sft"], "domain": ["pretrain", "sft"], "alignment": ["sft", "dpo"]}[goal]
    table = []
    for method in shape.trainable:
        for objective in objectives:
            table.append({"method": method, "objective": objective, "trainable": shape.trainable[method],
                          "memory_mb": round(estimate_memory_mb(shape, method, objective, gpu=gpu,
                                                                batch_size=batch_size, max_length=max_length)),
                          "step_s": round(estimate_step_seconds(shape, method, gpu=gpu_name if gpu else None,
                                                                batch_size=batch_size, max_length=max_length), 3)})

    def fits(method: str) -> bool:
        return all(r["memory_mb"] <= gpu_memory_mb * 0.9 for r in table if r["method"] == method)  # 10% headroom

    # No GPU or no budget: QLoRA. Some resources: LoRA, which trains faster and needs no de-quantising; full
    # fine-tuning is never the recommendation (the seeds: it risks catastrophic forgetting for the memory it costs).
    if not gpu:
        method, why = "qlora", "no GPU: QLoRA holds the base in 4 bits, the smallest footprint"
    elif fits("lora"):
        method, why = "lora", "LoRA fits in the GPU's memory (with 10% headroom)"
    elif fits("qlora"):
        method, why = "qlora", "LoRA does not fit in the GPU's memory, QLoRA does"
    else:
        method, why = "qlora", ("even QLoRA exceeds the GPU's memory at this batch and length: lower --batch-size "
                                "or --max-length, or turn on --gradient-checkpointing")
    return {"goal": goal, "combination": " + ".join(o.upper() if o != "pretrain" else "continued pretraining"
                                                   for o in objectives) + f" with {method}",
            "method": method, "objectives": objectives, "why": why, "estimates": table,
            "run": command(shape.name, method, goal)}


def command(model: str, method: str, goal: str) -> str:
    """The command (one stage) or the pipeline config (several stages) to run."""
    if goal == "task":
        return f"tuneforge train --model {model} --method {method} --objective sft --data YOUR_TASK.jsonl"
    stages = {"domain": [("pretrain", "pretrain", "[YOUR_DOMAIN_TEXT.jsonl:0.8, general:0.2]"),
                         ("sft", "sft", "YOUR_TASK.jsonl")],
              "alignment": [("sft", "sft", "YOUR_TASK.jsonl"), ("dpo", "dpo", "YOUR_PAIRS.jsonl")]}[goal]
    lines = ["# pipeline.yaml — run with: tuneforge train pipeline.yaml", f"model: {model}", f"method: {method}",
             f"output: runs/{goal}", "stages:"]
    for name, objective, data in stages:
        lines += [f"  - name: {name}", f"    objective: {objective}", f"    data: {data}"]
    return "\n".join(lines)


def format_report(result: dict[str, Any], shape: ModelShape, hardware: str) -> str:
    lines = [f"model: {shape.name} ({shape.params:,} parameters), {hardware}",
             f"{'method':<15}{'objective':<10}{'trainable':>14}{'peak memory':>14}{'s/step':>10}"]
    for r in result["estimates"]:
        lines.append(f"{r['method']:<15}{r['objective']:<10}{r['trainable']:>14,}{r['memory_mb']:>11,} MB"
                     f"{r['step_s']:>10.3g}")
    lines += ["", f"situation: {SITUATIONS[result['goal']]}", f"recommended: {result['combination']} — "
              f"{result['why']}", "", "run:", result["run"]]
    return "\n".join(lines)


def cmd_recommend(args: argparse.Namespace) -> int:
    from ..models.loading import DEFAULT_MODEL

    gpu_name = args.gpu.lower() if args.gpu else None  # H100 or h100
    check_request(args.goal, args.batch_size, args.max_length, gpu_name)
    gpu_memory = None if args.cpu or args.gpu_memory is None else parse_memory(args.gpu_memory)
    if gpu_name and gpu_memory is None:
        log.warning("--gpu %s without --gpu-memory: estimating for the CPU; give the GPU's memory (--gpu-memory "
                    "80GB) for its estimates", gpu_name)
    shape = model_shape(args.model or DEFAULT_MODEL)
    result = recommend(shape, args.goal, gpu_memory, batch_size=args.batch_size, max_length=args.max_length,
                       gpu_name=gpu_name)
    hardware = "CPU" if gpu_memory is None else f"GPU with {gpu_memory / 1024:g} GB"
    print(format_report(result, shape, hardware))
    return 0


def add_subcommands(sub) -> None:
    # No default model here: .models imports torch, and building the parser must not (`tuneforge --help`).
    p = sub.add_parser("recommend", help="estimate memory and time per method for a model and recommend the "
                       "combination that fits (the seeds' table by situation)")
    p.add_argument("--model", help="a model name or directory (default: the embedded SmolLM2-135M-Instruct)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu-memory", help="the GPU's memory, e.g. 24GB")
    where.add_argument("--cpu", action="store_true", help="no GPU (the default without --gpu-memory)")
    p.add_argument("--gpu", help="the GPU's name for the time estimate (h100, a100, l4, 4090, ...)")
    p.add_argument("--goal", default="task", choices=sorted(SITUATIONS),
                   help="task: SFT; domain: continued pretraining + SFT; alignment: SFT + DPO")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.set_defaults(func=cmd_recommend)


__all__ = ["model_shape", "shape_from_config", "memory_breakdown", "estimate_memory_mb", "estimate_step_seconds",
           "recommend", "ModelShape"]
