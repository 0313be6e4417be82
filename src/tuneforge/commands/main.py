"""The ``tuneforge`` command: every subcommand is a module of this package with ``add_subcommands(sub)``; this one
only builds the parser from them and turns a user's error into one line and exit 2. Logs go to stderr, results to
stdout.

Only light modules are imported here and by the command modules at import time: torch, transformers, datasets and
matplotlib are imported by the commands that use them, so `tuneforge --help` and a mistyped flag answer at once
(bench/bench_startup.py; tests/test_cli.py checks it)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import TuneforgeError
from . import (alignment, compare, convert, data, eval, export, generate, merge, methods, prompting, recommend, report,
               serve, studio, sweep, train, verify)

# In --help order: train, use, inspect, then the tools around them.
COMMANDS = [train, generate, eval, merge, verify, data, methods, prompting, alignment, serve, export, convert, report,
            compare, recommend, sweep, studio]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return (args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)) or 0
    except (TuneforgeError, OSError, ValueError, KeyError) as e:  # the user's to fix; anything else is a bug
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() is its repr
        print(f"tuneforge: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
