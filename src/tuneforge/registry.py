"""Name → class registries for methods and objectives: canonical names, aliases and command-line prefixes.

A class registers itself with ``@REGISTRY.register`` (its ``name``, its ``aliases``, and its ``flag_prefix``, the
prefix of its options on the command line: ``--lora-r 16``). Everything that turns a user's word into a method or
objective goes through here, so an alias works everywhere the name does.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from .options import option_names

class Registrable(Protocol):
    """What a registered class declares (``Method`` and ``Objective`` do)."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type[Any]]


T = TypeVar("T", bound=Registrable)


def canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package  # importing ``<package>._load_all`` registers every class
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        for name in (cls.name, *cls.aliases):
            key = canonical(name)
            if self._classes.get(key, cls) is not cls:
                raise ValueError(f"{self.kind} name {name!r} is taken by {self._classes[key].__name__}")
            self._classes[key] = cls
        self._name_config(cls)
        return cls

    def _name_config(self, cls: type[T]) -> None:
        """The class's name is declared once, on the class: its config class learns it here, as the attribute named
        after this registry's kind (``LoRAConfig.method == "lora"``), for messages and for finding a config's owner."""
        config = cls.config_class
        owner = vars(config).get(self.kind)
        if owner is not None and owner != cls.name:
            raise ValueError(f"{cls.__name__}.config_class {config.__name__} is not its own (it names {self.kind} "
                             f"{owner!r}); each {self.kind} declares a config class of its own")
        setattr(config, self.kind, cls.name)

    def _load(self) -> None:
        importlib.import_module(f"{self.package}._load_all")

    def get(self, name: str) -> type[T]:
        self._load()
        key = canonical(name)
        if key not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._classes[key]

    def names(self) -> list[str]:
        """Canonical names, sorted."""
        self._load()
        return sorted({cls.name for cls in self._classes.values()})

    def classes(self) -> list[type[T]]:
        return [self.get(name) for name in self.names()]

    def flag_prefixes(self) -> dict[str, type[T]]:
        """``{prefix: class}``, longest prefix first (``p_tuning_v2`` is tried before ``p_tuning``)."""
        # A class's own declaration only: P-Tuning v2 subclasses Prefix Tuning but keeps ``p_tuning_v2_``.
        prefixes = {canonical(vars(cls).get("flag_prefix") or cls.name): cls for cls in self.classes()}
        if len(prefixes) != len(self.classes()):
            raise ValueError(f"two {self.kind}s declare the same flag prefix")
        return dict(sorted(prefixes.items(), key=lambda item: -len(item[0])))

    def route(self, key: str) -> tuple[type[T], str] | None:
        """``lora_r`` -> (LoRA, "r"): the class whose prefix ``key`` carries, and the option it names. An option
        whose own name starts with the prefix (PEFT's ``lora_alpha``) keeps its name. None: no prefix matches."""
        key = canonical(key)
        for prefix, cls in self.flag_prefixes().items():
            if key.startswith(prefix + "_"):
                names = option_names(cls.config_class)
                stripped = key[len(prefix) + 1:]
                return cls, (key if stripped not in names and key in names else stripped)
        return None
