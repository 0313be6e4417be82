"""Hard prompt templates: a YAML file that turns a data record into a list of chat messages.

A template has a system (role) text, an instruction whose ``{field}`` placeholders are filled from the record,
optional few-shot examples (rendered as alternating user / assistant turns before the query) and an optional
reasoning instruction appended to the query turn::

    name: few_shot
    system: You are a careful annotator.
    instruction: "{instruction}\\n\\n{input?}"      # {input?} is optional: a missing field renders as ""
    reasoning: Think step by step, then write the final answer on a last line starting with "Answer:".
    answer_pattern: "Answer:\\s*(.+)"              # what the metric scores: the last match, group 1
    fewshot: {k: 3, strategy: similar, seed: 0, data: pool.jsonl}

Placeholders are ``{name}`` (required) and ``{name?}`` (optional); ``{{`` and ``}}`` are literal braces. Anything
else in braces (``{"question": ...}`` in a JSON example) is left as written, so teacher prompts that show JSON
need no escaping.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

Message = dict[str, str]
Record = dict[str, Any]

BUILTIN_DIR = Path(__file__).parent / "templates"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)(\?)?\}")
_BLANK_RUNS = re.compile(r"\n{3,}")


class TemplateError(ValueError):
    """A template file is invalid, or a record lacks a field the template needs; the message names both."""


class FewShot(BaseModel):
    """Where few-shot examples come from and how they are chosen."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(3, ge=0, description="Number of examples placed before the query.")
    strategy: Literal["first", "random", "similar"] = Field(
        "similar",
        description="first: the first k of the pool; random: k drawn per query with `seed`; "
        "similar: the k most TF-IDF-similar to the query, the most similar last (nearest the query).",
    )
    seed: int = Field(0, description="Seed of the `random` strategy; the draw also depends on the query text.")
    data: str | None = Field(
        None,
        description="JSONL/JSON/CSV file of example records, relative to the template file. Unset: the "
        "evaluated records themselves, leaving out the query (leave-one-out).",
    )


class PromptTemplate(BaseModel):
    """A hard prompt: role, instruction with record placeholders, few-shot examples, reasoning instruction."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Shown in reports and provenance; defaults to the file stem.")
    description: str = ""
    system: str | None = Field(None, description="System (role) message; placeholders allowed.")
    instruction: str = Field(description="The user turn; `{field}` placeholders are filled from the record.")
    reasoning: str | None = Field(None, description="Appended to the query turn only (not to few-shot turns).")
    response: str | None = Field(
        None, description="How a few-shot example's assistant turn is written, e.g. 'Answer: {output}'. "
        "Unset: the example's answer field verbatim.")
    answer_pattern: str | None = Field(
        None, description="Regex applied to the model output before scoring: the last match's group 1 (or the "
        "whole match) is the answer. No match: the whole output is scored.")
    fewshot: FewShot | None = None

    _source: str | None = PrivateAttr(None)  # the file it was read from, for error messages

    @property
    def source(self) -> str | None:
        return self._source

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return pattern

    @property
    def label(self) -> str:
        """Name for reports: ``name``, else the file stem, else ``template``."""
        if self.name:
            return self.name
        return Path(self.source).stem if self.source else "template"

    def where(self) -> str:
        return f"template {self.source or self.label}"

    def fill(self, text: str, record: Record) -> str:
        """Fill ``{field}`` / ``{field?}`` placeholders of ``text`` from ``record``."""
        return fill_placeholders(text, record, where=self.where())

    def query_text(self, record: Record) -> str:
        """The instruction filled from ``record``: what few-shot similarity compares."""
        return self.fill(self.instruction, record)

    def render(self, record: Record, examples: Sequence[Record] = (), answer_field: str = "output") -> list[Message]:
        """Render ``record`` (and few-shot ``examples`` before it) to chat messages."""
        messages: list[Message] = []
        if self.system:
            messages.append({"role": "system", "content": self.fill(self.system, record)})
        for example in examples:
            messages.append({"role": "user", "content": self.query_text(example)})
            messages.append({"role": "assistant", "content": self._example_answer(example, answer_field)})
        query = self.query_text(record)
        if self.reasoning:
            query = f"{query}\n\n{self.fill(self.reasoning, record)}"
        messages.append({"role": "user", "content": query})
        return messages

    def extract_answer(self, output: str) -> str:
        """The part of a model output that is scored (see ``answer_pattern``)."""
        if not self.answer_pattern:
            return output.strip()
        matches = list(re.finditer(self.answer_pattern, output))
        if not matches:
            return output.strip()
        last = matches[-1]
        return (last.group(1) if last.re.groups else last.group(0)).strip()

    def _example_answer(self, example: Record, answer_field: str) -> str:
        if self.response is not None:
            return self.fill(self.response, example)
        if answer_field not in example:
            raise TemplateError(f"{self.where()}: few-shot example has no answer field {answer_field!r} "
                                f"(fields: {', '.join(sorted(example))})")
        return _as_text(example[answer_field])


def fill_placeholders(text: str, record: Record, where: str = "template") -> str:
    """Replace ``{name}`` (required) and ``{name?}`` (optional) with record fields; tidy blank lines."""

    def substitute(match: re.Match) -> str:
        token, name, optional = match.group(0), match.group(1), match.group(2)
        if token in ("{{", "}}"):
            return token[0]
        if name not in record or record[name] is None:
            if optional:
                return ""
            fields = ", ".join(sorted(record)) or "none"
            raise TemplateError(f"{where}: the record has no field {name!r} (its fields: {fields}); "
                                f"write {{{name}?}} in the template if the field is optional")
        return _as_text(record[name])

    filled = _PLACEHOLDER.sub(substitute, text)
    # An empty optional field leaves a run of blank lines behind; one blank line is what the author meant.
    return _BLANK_RUNS.sub("\n\n", filled).strip()


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return str(value[0])  # a list of acceptable answers: the first is the canonical one
    return str(value)


def resolve_template_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a built-in template (``zero_shot``, ``few_shot``, ``cot`` ...)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = BUILTIN_DIR / f"{Path(str(name_or_path)).stem}.yaml"
    if path.suffix in ("", ".yaml", ".yml") and path.parent == Path(".") and builtin.is_file():
        return builtin
    known = ", ".join(builtin_template_names())
    raise TemplateError(f"template {str(name_or_path)!r} is neither a file nor a built-in template ({known})")


def builtin_template_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_template(name_or_path: str | Path) -> PromptTemplate:
    """Read and validate a template YAML file (or a built-in by name); errors name the file and the key."""
    path = resolve_template_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TemplateError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: expected a mapping of template keys, got {type(raw).__name__}")
    try:
        template = PromptTemplate.model_validate(raw)
    except ValidationError as e:
        raise TemplateError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None
    template._source = str(path)
    return template


def _describe(error: Any) -> str:  # pydantic ErrorDetails
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = PromptTemplate if len(error["loc"]) == 1 else FewShot
        allowed = ", ".join(parent.model_fields)
        return f"unknown key {key!r} (allowed: {allowed})"
    if error["type"] == "missing":
        return f"missing required key {key!r}"
    return f"key {key!r}: {error['msg']}"
