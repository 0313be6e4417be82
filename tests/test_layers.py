"""The package's floor plan (docs/architecture.md), checked on the source rather than by convention.

The package is a stack of layers; a module imports only from its own layer or a layer below it:

    commands/  (every subcommand; the only code that parses arguments and prints), __main__
    serve/, studio/
    choose/ (recommend, compare), prompting/
    run/ (trainer, checkpoints, distribution, tracking, pipelines, reports), config
    artifacts/ (merge, export, convert, verify)
    objectives/
    inference/ (loading base + adapter, generation, metrics, benchmarks)
    methods/
    models/ (loading, hub, kernels, log-probabilities), data/
    errors, options, registry, flags, outputs, progress

``tuneforge/__init__.py`` is the public facade: it re-exports names lazily from any layer and nothing imports it
for anything but that. Beside the stack, two rules keep the extension points independent: ``objectives/`` never
imports ``methods/`` (the trainer composes them), and no module outside ``commands/`` imports a command module.

Every module also imports on its own in a fresh interpreter, with no other tuneforge module imported before it
(Python still runs the parent packages' ``__init__`` first; that is the only thing that may).

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

# Bottom to top. The longest matching prefix places a module.
LAYERS = [
    ["tuneforge.errors", "tuneforge.options", "tuneforge.registry", "tuneforge.flags", "tuneforge.outputs",
     "tuneforge.progress"],
    ["tuneforge.models", "tuneforge.data"],
    ["tuneforge.methods"],
    ["tuneforge.inference"],
    ["tuneforge.objectives"],
    ["tuneforge.artifacts"],
    ["tuneforge.run", "tuneforge.config"],
    ["tuneforge.choose", "tuneforge.prompting"],
    ["tuneforge.serve", "tuneforge.studio"],
    ["tuneforge.commands", "tuneforge.__main__"],
]
FACADE = "tuneforge"
SIDEWAYS_RULES = [
    # (modules the rule applies to, prefixes they must not import, why)
    ("tuneforge.objectives", ["tuneforge.methods"], "methods and objectives never import each other"),
]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> int | None:
    """The layer a module sits in (index into LAYERS), or None for the facade and non-tuneforge modules."""
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if within(name, prefix)]
    return max(matches)[1] if matches else None


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
    assert "tuneforge.inference.loading" in names and "tuneforge.methods.adapter_files" in names
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


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in source_files() if module_name(p) != FACADE and layer_of(module_name(p)) is None]
    assert unplaced == [], "add new packages to LAYERS (and to docs/architecture.md)"


def test_no_module_imports_a_layer_above_its_own():
    def forbidden(name: str, target: str) -> str | None:
        if name == FACADE or target == FACADE:
            return None
        own, theirs = layer_of(name), layer_of(target)
        if theirs is not None and own is not None and theirs > own:
            return f"layer {own} ({LAYERS[own][0]}) imports layer {theirs} ({LAYERS[theirs][0]})"
        return None

    assert violations(forbidden) == []


def test_only_commands_import_commands():
    def forbidden(name: str, target: str) -> str | None:
        outside = not within(name, "tuneforge.commands") and name != "tuneforge.__main__"
        return "a library module imports a command module" if outside and within(target, "tuneforge.commands") else None

    assert violations(forbidden) == []


@pytest.mark.parametrize("layer,banned,why", SIDEWAYS_RULES, ids=[layer for layer, _, _ in SIDEWAYS_RULES])
def test_sideways_rule(layer, banned, why):
    def forbidden(name: str, target: str) -> str | None:
        if not within(name, layer):
            return None
        hit = next((b for b in banned if within(target, b)), None)
        return f"{layer} must not import {hit}: {why}" if hit else None

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
