"""Typed options: the dataclass base of every method's and objective's config, and its documentation.

Each option is a dataclass field followed by a docstring (PEP 257's attribute docstring), as in::

    r: int = 8
    \"\"\"Rank of the update.\"\"\"

``from_dict`` builds and validates an instance (unknown names are errors that list the known ones; a subclass's
``__post_init__`` checks values); ``describe`` reads the docstrings back from the source for ``--help``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any, ClassVar

import pydantic


@dataclasses.dataclass
class Options:
    """Base of an option dataclass; ``kind`` and ``owner_name`` name it in errors ("option(s) for method 'lora'")."""

    kind: ClassVar[str] = "options"
    option_aliases: ClassVar[dict[str, str]] = {}
    """Short names accepted for options (``init`` -> ``init_lora_weights``, so ``--lora-init pissa`` works)."""

    @classmethod
    def owner_name(cls) -> str:
        """The method's or objective's name, for messages."""
        return ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        values = {cls.option_aliases.get(k, k): v for k, v in values.items()}
        known = option_names(cls)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) for {cls.kind} {cls.owner_name()!r}: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        # __post_init__ normalises and checks values (``lstm`` -> ``LSTM``); pydantic then checks each normalised
        # value against its field's annotation, so ``r: "many"`` is an error naming ``r``, not a TypeError deep in
        # a method. The instance returned is the one built here (it may hold non-option state, e.g. a tokenizer).
        try:
            instance = cls(**values)
        except TypeError as e:
            cls._check_types(dict(values))
            raise ValueError(f"{cls.kind} {cls.owner_name()!r} options: {e}") from None
        checked = cls._check_types(dataclasses.asdict(instance))
        for f in dataclasses.fields(cls):  # the annotation's type: 1e9 -> 1000000000 for an int, "16" -> 16
            object.__setattr__(instance, f.name, getattr(checked, f.name))
        return instance

    @classmethod
    def _check_types(cls, values: dict[str, Any]):
        try:
            return _adapter(cls).validate_python(values)  # type: ignore[arg-type]  # a class hashes (mypy: __hash__ = None)
        except pydantic.ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}"
                                 for err in e.errors())
            raise ValueError(f"{cls.kind} {cls.owner_name()!r} options: {problems}") from None

    @classmethod
    def describe(cls) -> dict[str, tuple[Any, str]]:
        """``{option: (default, description)}`` in declaration order, inherited options first."""
        docs = attribute_docs(cls)  # type: ignore[arg-type]  # a class hashes
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out[f.name] = (default, docs.get(f.name, ""))
        return out


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def option_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated attribute of ``cls`` and its bases (the nearest class wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen / interactive): descriptions are optional
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
