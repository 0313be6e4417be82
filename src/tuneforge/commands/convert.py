"""``tuneforge convert SRC DST``: a pickle-weights model folder rewritten as safetensors (see
``artifacts/convert.py``)."""

from __future__ import annotations

import argparse


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="rewrite a pickle-weights model folder (pytorch_model.bin) as safetensors",
        description="tuneforge loads safetensors weights only. This reads SRC's pytorch_model.bin (or its shards) "
        "with torch's restricted unpickler, which refuses any pickle that asks for more than tensors, and writes "
        "DST: model.safetensors (or shards with an index) plus SRC's config, tokenizer and other non-pickle files.")
    p.add_argument("source", metavar="SRC", help="a Hugging Face model folder with pickle weights")
    p.add_argument("output", metavar="DST", help="a new folder (must not exist, or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Bad input raises ValueError / OSError subclasses, which the ``tuneforge`` command prints and exits 2 on."""
    from ..artifacts.convert import convert_to_safetensors

    for key, value in convert_to_safetensors(args.source, args.output, args.overwrite).items():
        print(f"{key}: {value}")
    return 0
