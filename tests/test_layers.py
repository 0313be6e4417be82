"""The package's layering (DESIGN.md, "Layout"), checked on the source rather than by convention.

Layers read top-down: cli -> (trainer | inference | serve | compare) -> objectives -> methods -> data / models.

Rules checked here:

* Every module under ``src/tuneforge`` imports on its own in a fresh interpreter, with no other tuneforge module
  imported before it (Python still runs the parent packages' ``__init__`` first; that is the only thing that may).
* CLI modules are ``tuneforge.cli`` (the ``tuneforge`` command) and the subcommand definitions that live beside
  their feature, ``tuneforge.prompting.cli`` and ``tuneforge.objectives.cli_alignment`` (``tuneforge.cli`` finds
  them by name at run time, it does not import them statically). A CLI module may import any library module. No
  library module may import a CLI module, and no module at all imports ``tuneforge.cli`` (the subcommand
  definitions do not reach back into the command). Everything else is a library module.
* Library modules only (CLI modules are exempt, they sit on top):
  - ``methods/`` never imports ``objectives/``, ``trainer``, ``inference`` or ``checkpoint`` (adapter files are
    ``methods/adapter_files.py``; checkpoint.py is training state, which belongs to the trainer);
  - ``objectives/`` never imports ``trainer`` or ``methods/`` (methods and objectives never import each other;
    ``trainer`` composes them). Reward scoring loads its backbone with ``tuneforge.inference`` (a function-level
    import in ``objectives/reward.py``), the one loader that knows about methods;
  - ``data/`` and ``models.py`` import neither ``methods/`` nor ``objectives/`` (nor ``trainer`` / ``inference``);
  - ``inference`` never imports ``objectives/`` or ``trainer`` (reward scoring loads its backbone through
    ``inference``, so the reverse would be a cycle).

Imports are read with ``ast`` from every file, wherever they are: module level, inside functions (a lazy import is
still a dependency) and under ``if TYPE_CHECKING``. Relative imports are resolved against the file's package.
Imports built from strings (``importlib.import_module``) are not seen.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tuneforge"

CLI_MODULES = {"tuneforge.cli", "tuneforge.__main__", "tuneforge.prompting.cli", "tuneforge.objectives.cli_alignment"}

LIBRARY_LAYER_RULES = [
    # (modules the rule applies to, prefixes they must not import)
    ("tuneforge.methods", ["tuneforge.objectives", "tuneforge.trainer", "tuneforge.inference", "tuneforge.checkpoint"]),
    ("tuneforge.objectives", ["tuneforge.trainer", "tuneforge.methods"]),
    ("tuneforge.data", ["tuneforge.methods", "tuneforge.objectives", "tuneforge.trainer", "tuneforge.inference"]),
    ("tuneforge.models", ["tuneforge.methods", "tuneforge.objectives", "tuneforge.trainer", "tuneforge.inference"]),
    ("tuneforge.inference", ["tuneforge.objectives", "tuneforge.trainer"]),
]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """``(module, line)`` for every import in ``path``. ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be
    a submodule); relative imports are made absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def violations(is_forbidden) -> list[str]:
    out = []
    for path in source_files():
        name = module_name(path)
        for target, line in imports_of(path):
            reason = is_forbidden(name, target)
            if reason:
                out.append(f"{path.relative_to(SRC.parent)}:{line}: {name} imports {target} ({reason})")
    return sorted(set(out))


def test_the_import_reader_resolves_relative_and_function_level_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "tuneforge" / "methods"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("from ..trainer import train\n\ndef f():\n    from .. import cli\n"
                              "    import tuneforge.objectives.sft\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    got = {m for m, _ in imports_of(pkg / "x.py")}
    assert {"tuneforge.trainer", "tuneforge.trainer.train", "tuneforge", "tuneforge.cli",
            "tuneforge.objectives.sft"} == got


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = [module_name(p) for p in source_files()]
    assert "tuneforge.inference" in names and "tuneforge.methods.adapter_files" in names
    # One interpreter (third-party imports such as torch stay cached, so this is quick); before each module every
    # tuneforge module is dropped, so each import starts from nothing of ours.
    code = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for key in [k for k in sys.modules if k == 'tuneforge' or k.startswith('tuneforge.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException:\n"
        "        failed.append(name + ':\\n' + traceback.format_exc())\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nothing_imports_the_cli_and_no_library_module_imports_a_subcommand_module():
    def forbidden(name: str, target: str) -> str | None:
        if within(target, "tuneforge.cli") and name not in ("tuneforge.cli", "tuneforge.__main__"):
            return "nothing imports the tuneforge command (but `python -m tuneforge`, which is it)"
        if name not in CLI_MODULES and any(within(target, cli) for cli in CLI_MODULES):
            return "a library module imports a CLI module"
        return None

    assert violations(forbidden) == []


@pytest.mark.parametrize("layer,banned", LIBRARY_LAYER_RULES, ids=[layer for layer, _ in LIBRARY_LAYER_RULES])
def test_layer_rule(layer, banned):
    def forbidden(name: str, target: str) -> str | None:
        if name in CLI_MODULES or not within(name, layer):
            return None
        hit = next((b for b in banned if within(target, b)), None)
        return f"{layer} must not import {hit}" if hit else None

    assert violations(forbidden) == []


def test_adapter_file_names_are_spelled_in_one_module():
    """The name of tuneforge's adapter record is ``methods/adapter_files.py``'s constant; no other code or
    docstring types it again (comments are not code and are not checked)."""
    owner = PACKAGE / "methods" / "adapter_files.py"
    offenders = []
    for path in source_files():
        if path == owner:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            literal = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if literal and "tuneforge_adapter.json" in node.value:
                offenders.append(f"{path.relative_to(SRC.parent)}:{node.lineno}")
    assert offenders == []
