"""What several commands share: the flags and dtype of a command that loads a base model (+ adapter)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("tuneforge")


def inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model (default: the adapter's base, else the embedded model)")
    p.add_argument("--adapter", help="an adapter / run directory to apply")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--data-format", default="auto")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the base's precision (default: the one the run trained in, on this kind of device)")


def inference_dtype(args: argparse.Namespace) -> str | None:
    """--dtype, else the precision the run trained in (on the same kind of device), said on stderr: the exact match
    `eval` reports is then the one training reported (a bf16 and a float32 base can differ by a few answers)."""
    from ..inference.loading import training_dtype

    if args.dtype or not args.adapter:
        return args.dtype
    dtype = training_dtype(args.adapter, args.device)
    if dtype is not None:
        log.info("computing in %s, the precision %s trained in (--dtype float32 to change)", dtype, args.adapter)
    return dtype
