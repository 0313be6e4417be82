"""The training form, generated from what the library declares: every ``RunConfig`` field, and every option of
every registered method and objective (its dataclass field, its annotation, its attribute docstring as help).

Nothing here knows a particular method. A field becomes a flag token pair (``--lora-r 16``) only when its value
differs from the declared default, and the tokens are checked the way ``tuneforge train`` checks its flags
(``flags.parse_overrides`` then ``config.load_config``), so the form refuses exactly what the command refuses, and
"copy as command" is the command the studio then runs.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import types
import typing
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from ..flags import parse_overrides

NULL = "null"  # the choice that leaves an optional value unset (what the flag parser reads as None)
# Per-option sections are routed by the method's / objective's flag prefix; these keys hold them in YAML instead.
ROUTED = ("method_options", "objective_options")


@dataclasses.dataclass
class FormField:
    """One input of the form: where its value goes and how it is shown."""

    section: str  # "run", or "method:lora" / "objective:dpo"
    option: str  # the name in the config (``r``; for run fields the RunConfig key)
    key: str  # the flag key (``lora_r``): ``--lora-r``
    kind: str  # bool | int | float | choice | text: the widget
    default: Any
    help: str
    type_name: str  # the annotation as written (``int``, ``float | None``)
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def elem_id(self) -> str:
        return "field-" + re.sub(r"[^\w-]", "-", f"{self.section}-{self.option}")

    @property
    def label(self) -> str:
        return f"{self.option} ({self.type_name})"

    def initial(self) -> Any:
        """The widget's starting value: the default as the widget holds it."""
        if self.kind in ("bool", "int", "float"):
            return self.default
        if self.kind == "choice" and self.default is None:
            return NULL
        return show(self.default)

    def tokens(self, value: Any) -> list[str]:
        """``[flag, text]`` for a value that differs from the default; [] for the default (or an empty optional)."""
        if self.kind == "bool":
            return [] if bool(value) == bool(self.default) else [self.flag, "true" if value else "false"]
        if self.kind in ("int", "float"):
            if value is None or value == "":
                return [] if self.default is None else [self.flag, NULL]
            if self.default is not None and float(value) == float(self.default):
                return []
            return [self.flag, number_text(value, self.kind)]
        text = "" if value is None else str(value).strip()
        if text == show(self.default) or (text in ("", NULL) and self.default is None):
            return []
        return [self.flag, text if text else NULL]


def show(value: Any) -> str:
    """A default as the text a user would type for it (lists comma-separated, as flags take them)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip() if value else ""
    return str(value)


def number_text(value: Any, kind: str) -> str:
    if kind == "int" and float(value).is_integer():
        return str(int(value))
    return repr(float(value)) if kind == "float" else str(value)  # 2.5 for an int: the config names the field


# -- from annotations to widgets -------------------------------------------------------------------------------


def type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def widget(annotation: Any) -> tuple[str, tuple[str, ...]]:  # (kind, choices)
    """(kind, choices) for an annotation: booleans tick, numbers are numbers, closed sets are drop-downs, and
    everything else (lists, unions with lists, free text) is text the flag parser reads."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        closed = [c for c in (choices_of(a) for a in rest) if c is not None]
        if len(closed) == len(rest):  # bool | Literal[...], Literal | None, bool | None
            return "choice", (*([NULL] if optional else []), *[c for group in closed for c in group])
        return "text", ()  # an optional number too: an empty box is "unset", which a number box cannot say
    if annotation is bool:
        return "bool", ()
    if annotation in (int, float):
        return annotation.__name__, ()
    if origin is Literal:
        return "choice", tuple(show(a) for a in args)
    return "text", ()


def choices_of(annotation: Any) -> tuple[str, ...] | None:
    if annotation is bool:
        return ("true", "false")
    if typing.get_origin(annotation) is Literal:
        return tuple(show(a) for a in typing.get_args(annotation))
    return None


# -- the fields --------------------------------------------------------------------------------------------------


def run_fields() -> list[FormField]:
    """Every RunConfig key but the two option mappings (their options are fields of their own)."""
    from ..config import RunConfig
    from ..data.formats import FORMATS
    from ..methods.base import METHODS
    from ..objectives.base import OBJECTIVES

    # As `train --help` lists them: the names come from the registries, so a new method needs no edit here.
    named = {"method": tuple(METHODS.names()), "objective": tuple(OBJECTIVES.names()),
             "data_format": ("auto", *FORMATS)}
    fields = []
    for name, info in RunConfig.model_fields.items():
        if name in ROUTED:
            continue
        kind, choices = ("choice", named[name]) if name in named else widget(info.annotation)
        fields.append(FormField("run", name, name, kind, info.get_default(call_default_factory=True),
                                info.description or "", type_name(info.annotation), choices))
    return fields


def option_fields(registry_kind: str, name: str) -> list[FormField]:
    """The options of one method or objective, under the flags `tuneforge train` routes to it (its prefix)."""
    from ..config import RunConfig

    registry = _registry(registry_kind)
    cls = registry.get(name)
    prefix = next(p for p, c in registry.flag_prefixes().items() if c is cls)
    hints = typing.get_type_hints(cls.config_class)
    fields = []
    for option, (default, text) in cls.config_class.describe().items():
        if option in RunConfig.model_fields:  # run-level keys the trainer passes on (seed, max_length_policy)
            continue
        key = option if option.startswith(prefix + "_") else f"{prefix}_{option}"
        kind, choices = widget(hints[option])
        fields.append(FormField(f"{registry_kind}:{cls.name}", option, key, kind, default, text,
                                type_name(hints[option]), choices))
    return fields


def _registry(kind: str):
    from ..methods.base import METHODS
    from ..objectives.base import OBJECTIVES

    return {"method": METHODS, "objective": OBJECTIVES}[kind]


def all_fields() -> list[FormField]:
    """The whole form, in a fixed order: run fields, then each method's options, then each objective's."""
    fields = run_fields()
    for kind in ("method", "objective"):
        for name in _registry(kind).names():
            fields += option_fields(kind, name)
    return fields


# -- from a filled-in form to a command -------------------------------------------------------------------------


@dataclasses.dataclass
class Filled:
    """The form's values turned into ``tuneforge train`` tokens, and what checking them found."""

    tokens: list[str]
    config: Any = None  # the RunConfig, when valid
    error: str | None = None
    field: FormField | None = None  # the field the error names, when one does

    @property
    def command(self) -> str:
        return "tuneforge train " + shlex.join(self.tokens)

    @property
    def yaml(self) -> str:
        """The resolved config: ``tuneforge train THIS.yaml`` runs the same run."""
        if self.config is None:
            return ""
        return yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)


def tokens_for(fields: list[FormField], values: list[Any]) -> list[str]:
    """Flag tokens for the run fields and for the options of the chosen method and objective only (the others'
    widgets stay hidden and are not sent)."""
    by_key = {f.option: v for f, v in zip(fields, values) if f.section == "run"}
    chosen = {f"method:{canonical_name('method', by_key.get('method'))}",
              f"objective:{canonical_name('objective', by_key.get('objective'))}"}
    tokens: list[str] = []
    for field, value in zip(fields, values):
        if field.section == "run" or field.section in chosen:
            tokens += field.tokens(value)
    return tokens


def canonical_name(kind: str, name: Any) -> str:
    try:
        return _registry(kind).get(str(name)).name
    except ValueError:
        return str(name)


def check(fields: list[FormField], values: list[Any]) -> Filled:
    """The tokens and their validation, through the same parser and config the command uses."""
    filled = Filled(tokens_for(fields, values))
    try:
        filled.config = config_from_tokens(filled.tokens)
    except (ConfigError, ValueError) as e:
        # load_config names its source first (the command line, or the demo's YAML underneath): the form is it.
        filled.error = re.sub(r"^(command line|\S+\.yaml): ", "", str(e))
        filled.field = field_named(filled.error, fields, filled.tokens)
    return filled


def config_from_tokens(tokens: list[str]):
    """What ``tuneforge train TOKENS`` builds: with no data, the bundled demonstration's config underneath (the
    command's rule, as in compare.run_config)."""
    from ..config import load_config
    from ..run.training_data import DEMO_DIR

    overrides = parse_overrides(list(tokens))
    return load_config(None if overrides.get("data") is not None else DEMO_DIR / "demo.yaml", overrides)


def field_named(error: str, fields: list[FormField], tokens: list[str]) -> FormField | None:
    """The field an error message is about, among those sent: ``learning_rate: ...``, ``options: r: ...``,
    ``lora r must ...``, ``lora_dropout must ...``."""
    sent = {token[2:].replace("-", "_") for token in tokens if token.startswith("--")}
    candidates = [f for f in fields if f.key in sent]
    for field in candidates:
        owner = field.section.partition(":")[2]
        patterns = [rf"^{field.option}:", rf"options: {field.option}:", rf"\b{field.option} must\b",
                    rf"^{owner} {field.option}\b" if owner else None, rf"^{field.key}\b"]
        if any(p and re.search(p, error) for p in patterns):
            return field
    return None
