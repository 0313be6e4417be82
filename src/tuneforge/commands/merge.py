"""``tuneforge merge``: a LoRA-family adapter folded into its base, written as a plain Hugging Face model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_subcommands(sub) -> None:
    merge = sub.add_parser("merge", help="fold a LoRA-family adapter into the base: a plain HF model directory")
    merge.add_argument("adapter", help="the run / adapter directory")
    merge.add_argument("--output", required=True)
    merge.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    merge.add_argument("--device")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    merge.add_argument("--no-verify", action="store_true", help="skip comparing the merged model with the adapter "
                       "(tuneforge verify; summary in OUTPUT/verify.json); a failed check exits 1")
    merge.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from ..artifacts.merge import merge_adapter

    report = merge_adapter(args.adapter, args.output, model_name=args.model, device=args.device,
                           overwrite=args.overwrite, verify=not args.no_verify)
    verification = report.pop("verification", None)
    for key, value in report.items():
        print(f"{key}: {value}")
    if verification is not None:
        from ..artifacts.verify import format_summary

        print(format_summary(verification))
        return 0 if verification["passed"] else 1
    return 0
