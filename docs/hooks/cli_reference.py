"""mkdocs hook: the CLI reference page is the parser's own ``--help``, rendered at build time.

``docs/reference/cli.md`` holds the marker below; the hook replaces it with one section per subcommand, walked from
the parser of the ``tuneforge`` entry point named in pyproject.toml. The page cannot drift from the code, and a
parser that fails to build fails the docs build.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tomllib
from pathlib import Path

MARKER = "<!-- cli-reference -->"
WIDTH = "110"  # argparse wraps help to $COLUMNS: a fixed width gives the same page on every machine


def entry_point_parser(root: Path) -> argparse.ArgumentParser:
    """``build_parser()`` of the module behind ``[project.scripts] tuneforge`` (``tuneforge.commands.main:main``)."""
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    module = importlib.import_module(scripts["tuneforge"].split(":")[0])
    return module.build_parser()


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(("train",), parser)``, ``(("data", "preview"), parser)``, ... depth first, in the order of ``--help``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from subcommands(sub, (*path, name))


def reference(root: Path) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = entry_point_parser(root)
        sections = [f"## `tuneforge`\n\n```text\n{parser.format_help()}```\n"]
        sections += [f"## `tuneforge {' '.join(path)}`\n\n```text\n{sub.format_help()}```\n"
                     for path, sub in subcommands(parser)]
    finally:
        if previous is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(sections)


def on_config(config, **kwargs):
    # The package of this checkout, not whichever tuneforge the environment has installed.
    sys.path.insert(0, str(Path(config.config_file_path).parent / "src"))
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference(Path(config.config_file_path).parent))
