"""``tuneforge recommend``: memory and time per method for a model on given hardware, the combination that fits,
and the exact command (``choose/recommend.py``)."""

from __future__ import annotations

import argparse
import logging

from ..choose.recommend import (SITUATIONS, check_request, format_report, measured_calibrations, model_heads,
                                model_shape, parse_memory, recommend, system_ram_mb)

log = logging.getLogger(__name__)


def cmd_recommend(args: argparse.Namespace) -> int:
    from ..models.loading import DEFAULT_MODEL

    gpu_name = args.gpu.lower() if args.gpu else None  # H100 or h100
    if args.max_length == "auto":  # the longest context that fits, per method and setup (choose/long_context.py)
        return cmd_longest_context(args)
    check_request(args.goal, args.batch_size, args.max_length, gpu_name, args.micro_batch_size)
    gpu_memory = None if args.cpu or args.gpu_memory is None else parse_memory(args.gpu_memory)
    ram = parse_memory(args.ram, "--ram") if args.ram else system_ram_mb()
    if gpu_name and gpu_memory is None:
        log.warning("--gpu %s without --gpu-memory: estimating for the CPU; give the GPU's memory (--gpu-memory "
                    "80GB) for its estimates", gpu_name)
    model = args.model or DEFAULT_MODEL
    shape = model_shape(model)
    measured = measured_calibrations(shape, model, args.runs, gpu_memory is not None, gpu_name) if args.runs else {}
    result = recommend(shape, args.goal, gpu_memory, batch_size=args.batch_size, max_length=args.max_length,
                       micro_batch_size=args.micro_batch_size, gpu_name=gpu_name, ram_mb=ram, calibrations=measured)
    hardware = "CPU" if gpu_memory is None else f"GPU with {gpu_memory / 1024:g} GB"
    print(format_report(result, shape, hardware))
    return 0


def cmd_longest_context(args: argparse.Namespace) -> int:
    from ..models.loading import DEFAULT_MODEL
    from ..choose.long_context import format_longest, longest_contexts

    if args.cpu or args.gpu_memory is None:
        raise ValueError("--max-length auto projects GPU memory: give the GPU's memory (--gpu-memory 80GB)")
    if args.gpus < 1:
        raise ValueError(f"--gpus must be a positive integer, got {args.gpus}")
    gpu_memory = parse_memory(args.gpu_memory)
    shape = model_shape(args.model or DEFAULT_MODEL, ("full", "lora", "qlora"))
    rows = longest_contexts(shape, ["qlora", "lora", "full"], gpu_memory, args.gpus, model_heads(args.model))
    print(format_longest(rows, shape, f"{args.gpus} x GPU with {gpu_memory / 1024:g} GB"))
    return 0


def max_length_arg(text: str) -> int | str:
    """``--max-length``: tokens, or ``auto`` (the longest context that fits)."""
    return "auto" if text == "auto" else int(text) if text.lstrip("-").isdigit() else text


def add_subcommands(sub) -> None:
    # No default model here: .models imports torch, and building the parser must not (`tuneforge --help`).
    p = sub.add_parser("recommend", help="estimate memory and time per method for a model and recommend the "
                       "combination that fits (the seeds' table by situation), with the exact command")
    p.add_argument("--model", help="a model name or directory (default: the embedded SmolLM2-135M-Instruct); a "
                   "folder with only config.json will do")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu-memory", help="the GPU's memory, e.g. 24GB")
    where.add_argument("--cpu", action="store_true", help="no GPU (the default without --gpu-memory)")
    p.add_argument("--gpu", help="the GPU's name for the time estimate (h100, a100, l4, 4090, ...)")
    p.add_argument("--ram", help="on a CPU: the memory to plan for, e.g. 64GB (default: this machine's)")
    p.add_argument("--goal", default="task", choices=sorted(SITUATIONS),
                   help="task: SFT; domain: continued pretraining + SFT; alignment: SFT + DPO")
    p.add_argument("--batch-size", type=int, help="examples per optimiser step (default: train's, 8)")
    p.add_argument("--micro-batch-size", type=int, help="examples per forward pass (default: the batch size)")
    p.add_argument("--max-length", type=max_length_arg, help="tokens per example (default: train's, 512); auto: the "
                   "longest context that fits, per method and setup (one row per step, checkpointing, tiled MLP, "
                   "offload, context parallel over --gpus)")
    p.add_argument("--gpus", type=int, default=1, help="--max-length auto: GPUs the run may use")
    p.add_argument("--runs", default="runs", help="where finished runs of this model (compare, sweep, train) are "
                   "read for measured peaks and step times on this machine (default runs/; '' for none)")
    p.set_defaults(func=cmd_recommend)
