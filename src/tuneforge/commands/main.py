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
from ..choose import compare, recommend
from . import alignment, convert, data, eval, export, generate, merge, methods, prompting, report, serve, train, verify

# In --help order: train, use, inspect, then the tools around them.
COMMANDS = [train, generate, eval, merge, verify, data, methods, prompting, alignment, serve, export, convert, report,
            compare, recommend]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_subcommands(sub)
    return parser


<<<<<<< HEAD
TRAIN_DESCRIPTION = ("Any config key is also a flag (--learning-rate 1e-4); method options by prefix (--lora-r 16, "
                     "--prefix-num-virtual-tokens 20); objective options too (--dpo-beta 0.1). Flags override the "
                     "YAML file.")


class TrainHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``train --help`` ends with every config key and every method's and objective's options. Listing them imports
    the registries (and torch), so it is done when that help is printed, not whenever the parser is built."""

    def add_text(self, text: str | None) -> None:
        if text == TRAIN_DESCRIPTION:
            text += "\n\nConfig keys:\n" + _config_help()
        super().add_text(text)


def _extensions():
    """Subcommands that live beside their feature (prompting, alignment)."""
    found = []
    for module, attr in (("tuneforge.commands.prompting", "add_subcommands"),
                         ("tuneforge.commands.alignment", "add_subcommands"),
                         ("tuneforge.commands.serve", "add_subcommands"),
                         ("tuneforge.commands.convert", "add_subcommands"),
                         ("tuneforge.run.report", "add_subcommands"),
                         ("tuneforge.choose.compare", "add_subcommands"), ("tuneforge.choose.recommend",
                         "add_subcommands"), ("tuneforge.commands.studio", "add_subcommands")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        found.append(getattr(mod, attr))
    return found


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model (default: the adapter's base, else the embedded model)")
    p.add_argument("--adapter", help="an adapter / run directory to apply")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--data-format", default="auto")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the base's precision (default: the one the run trained in, on this kind of device)")


def _config_help() -> str:
    """Every run key, then every method's and objective's options under their declared flag prefix."""
    from ..config import RunConfig
    from ..methods.base import METHODS
    from ..objectives.base import OBJECTIVES

    from ..data.formats import FORMATS

    # The choices come from the registries, so a new method, objective or data format is listed without an edit here.
    choices = {"method": METHODS.names(), "objective": OBJECTIVES.names(), "data_format": ["auto", *FORMATS]}
    lines = [f"  --{name.replace('_', '-'):<32} {f.description}"
             + (f" One of: {', '.join(choices[name])}." if name in choices else "")
             for name, f in RunConfig.model_fields.items()]
    for title, registry in (("Method options", METHODS), ("Objective options", OBJECTIVES)):
        for prefix, cls in reversed(registry.flag_prefixes().items()):
            section = "method_options" if registry is METHODS else "objective_options"
            lines.append(f"\n{title}: {cls.name} (--{prefix.replace('_', '-')}-OPTION; in YAML under {section})")
            for option, (default, text) in cls.config_class.describe().items():
                if option in RunConfig.model_fields:  # run-level keys the trainer passes on (seed, max_length_policy)
                    continue
                flag = option if option.startswith(prefix + "_") else f"{prefix}_{option}"
                lines.append(f"  --{flag.replace('_', '-'):<32} {text} [default: {default}]")
    return "\n".join(lines)


=======
>>>>>>> main
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
