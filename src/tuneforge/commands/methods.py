"""``tuneforge methods``: every method with its trainable parameters on a model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..flags import parse_overrides


def add_subcommands(sub) -> None:
    methods = sub.add_parser("methods", help="list every method with its trainable parameters on a model; "
                             "method options as flags (--lora-r 16)")
    methods.add_argument("--model", default=None)
    methods.set_defaults(func=cmd_methods, passthrough=True)


def cmd_methods(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from ..methods.report import methods_table

    print(methods_table(args.model, parse_overrides(list(extra))))
    return 0
