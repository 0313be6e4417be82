"""The manual builds: `mkdocs build --strict` (what `make docs` runs) fails on a broken link or anchor, a page left
out of the nav, an included example file that moved, or an API reference to a name that no longer exists. Builds
the whole site with no network (~10-20 s on 2 cores: it imports the CLI parser and reads the package with griffe),
so it is marked slow."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def cli_hook():
    """docs/hooks/cli_reference.py, the build hook that writes the CLI page: the test walks the same parser."""
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.mark.slow
def test_the_docs_build_strict_and_offline(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    assert {"index.html", "architecture/index.html", "extending/index.html", "reference/cli/index.html",
            "reference/python/index.html"} <= pages
    for page in site.rglob("*.html"):  # the theme's fonts are the system's: nothing to fetch when the page opens
        assert "fonts.googleapis.com" not in page.read_text(), page


@pytest.mark.slow
def test_the_generated_pages_hold_the_code(site):
    hook = cli_hook()
    cli = (site / "reference" / "cli" / "index.html").read_text()
    paths = [path for path, _ in hook.subcommands(hook.entry_point_parser(ROOT))]
    assert {("train",), ("data", "preview"), ("serve",)} <= set(paths)
    for path in paths:  # every subcommand has its section
        assert f'id="tuneforge-{"-".join(path)}"' in cli, path
    assert "--lora-r" in cli and "--dpo-beta" in cli  # train's help: the options of every method and objective
    guide = (site / "extending" / "index.html").read_text()
    assert "IA3Handle" in guide and "hinge_loss" in guide  # the example files, included as they are
    api = (site / "reference" / "python" / "index.html").read_text()
    assert "Rank of the update" in api  # LoRAConfig.r's docstring, read by mkdocstrings
