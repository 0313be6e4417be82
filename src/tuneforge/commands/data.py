"""``tuneforge data preview``: one rendered example with its supervised tokens marked."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def add_subcommands(sub) -> None:
    data = sub.add_parser("data", help="inspect data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prev = data_sub.add_parser("preview", help="show one rendered example with its supervised tokens marked")
    prev.add_argument("data")
    prev.add_argument("--model", default=None, help="whose tokenizer / chat template (default: embedded)")
    prev.add_argument("--index", type=int, default=0)
    prev.add_argument("--data-format", default="auto")
    prev.add_argument("--objective", default=None, help="an objective's name: one that trains on text (pretrain) "
                      "supervises every token (default: from the data)")
    prev.add_argument("--chat-template", default=None)
    prev.add_argument("--no-color", action="store_true")
    prev.set_defaults(func=cmd_data_preview)


def cmd_data_preview(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from ..data.preview import preview
    from ..objectives.base import get_objective

    # The objective's declared record kinds decide the view: one that trains on text supervises every token.
    as_text = args.objective is not None and "text" in get_objective(args.objective).kinds
    print(preview(args.data, model_name=args.model, index=args.index, data_format=args.data_format,
                  as_text=as_text, chat_template=args.chat_template, color=not args.no_color and
                  sys.stdout.isatty()))
    return 0
