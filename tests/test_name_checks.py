"""Ask, don't compare (STYLE.md, 7): behaviour that depends on the method or objective is a declared attribute or hook
on its class, never ``if config.method == "full"``. This reads every module under ``src/tuneforge`` and fails on
a comparison of anything with a registered method's or objective's name or alias (``==``, ``!=``, ``in (...)``).

Also here: a method's or objective's name is declared once, on its class, and its config class learns it when the
class registers.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import tuneforge
from tuneforge.methods.base import METHODS, MethodConfig
from tuneforge.objectives.base import OBJECTIVES
from tuneforge.registry import Registry, canonical

SRC = Path(tuneforge.__file__).parent

# Option values that happen to spell an objective's name: GRPO's loss_type "grpo" (TRL's), KTO's loss_type "kto".
# A comparison whose other side is one of these is about the option, not about which objective runs.
SAME_SPELLING = {"loss_type"}


def registered_names() -> set[str]:
    names = set()
    for registry in (METHODS, OBJECTIVES):
        for cls in registry.classes():
            names.update(canonical(n) for n in (cls.name, *cls.aliases))
    return names


def constants(node: ast.expr) -> list[str]:
    """The string constants a comparison operand holds: itself, or the items of a tuple / list / set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def compared_values(node: ast.Compare) -> list[str]:
    """The string constants ``node`` compares something with: either side of ``==`` / ``!=``, the literal collection
    right of ``in`` / ``not in`` (``"text" in keys`` looks a key up; it compares no name)."""
    values = []
    for left, op, right in zip([node.left, *node.comparators], node.ops, node.comparators):
        if isinstance(op, (ast.Eq, ast.NotEq)):
            values += constants(left) + constants(right)
        elif isinstance(op, (ast.In, ast.NotIn)) and isinstance(right, (ast.Tuple, ast.List, ast.Set)):
            values += constants(right)
    return values


def last_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


def name_comparisons(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each comparison in ``source`` against one of ``names``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        if any(last_name(operand) in SAME_SPELLING for operand in [node.left, *node.comparators]):
            continue
        # Names as written in code and configs: lower case, hyphens or underscores (PEFT's "LORA" is a file field).
        found += [(node.lineno, value) for value in compared_values(node) if value.replace("-", "_") in names]
    return sorted(found)


def test_no_module_compares_with_a_method_or_objective_name():
    names = registered_names()
    offences = [f"{path.relative_to(SRC.parent)}:{line}: compares with {value!r}"
                for path in sorted(SRC.rglob("*.py"))
                for line, value in name_comparisons(path.read_text(), names)]
    assert not offences, ("declare the behaviour on the class (an attribute or hook with a default in the base) "
                          "instead of comparing names:\n" + "\n".join(offences))


@pytest.mark.parametrize("code, caught", [
    ('if config.method == "full": pass', ["full"]),
    ('ok = "qlora" != name', ["qlora"]),
    ('if objective in ("dpo", "kto"): pass', ["dpo", "kto"]),
    ('if o not in ["continued-pretraining"]: pass', ["continued-pretraining"]),  # an alias, hyphenated
    ('if loss_type == "grpo": pass', []),  # GRPO's loss_type option, spelt like the objective
    ('if mode == "fast": pass', []),
    ('if "instruction" in keys: pass', []),  # a key looked up, though SFT's alias is spelt so
    ('ok = saved["peft_type"] == "LORA"', []),  # PEFT's file field, not a tuneforge name
    ('"""docs may say config.method == "full"."""', []),
])
def test_the_check_finds_comparisons(code, caught):
    assert [value for _, value in name_comparisons(code, registered_names())] == caught


def test_config_classes_learn_their_owner_name_at_registration():
    for registry in (METHODS, OBJECTIVES):
        for cls in registry.classes():
            assert getattr(cls.config_class, registry.kind) == cls.name
            assert cls.config_class.owner_name() == cls.name


def test_a_class_cannot_share_another_ones_config_class():
    registry: Registry = Registry("method", "tuneforge.methods")

    @dataclasses.dataclass
    class OwnConfig(MethodConfig):
        pass

    class First:
        name, aliases, config_class = "first_test_method", (), OwnConfig

    class Second:
        name, aliases, config_class = "second_test_method", (), OwnConfig

    registry.register(First)
    assert OwnConfig.method == "first_test_method"
    with pytest.raises(ValueError, match="not its own"):
        registry.register(Second)
