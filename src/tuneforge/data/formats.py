"""Records in: read JSONL / JSON / CSV / Parquet (or a hub data set), detect the shape, validate, normalise.

Shapes (detected from the keys, or named with ``format=``):

* ``alpaca``      ``instruction``, optional ``input``, ``output``; optional ``system`` and ``history``
                  (a list of ``[instruction, output]`` pairs that came before)
* ``messages``    ``messages: [{role, content}, ...]`` (OpenAI style)
* ``sharegpt``    ``conversations: [{from, value}, ...]`` (``human``/``gpt``/``system`` roles)
* ``text``        ``text`` — raw text for continued pretraining
* ``preference``  ``prompt``, ``chosen``, ``rejected`` — strings, or message lists (conversational form)
* ``prompt``      ``prompt`` alone, or ``messages`` ending with a user turn — prompts for PPO rollouts
* ``unpaired``    ``prompt``, ``completion``, ``label`` (true: a good answer, false: a bad one) — KTO's data

Every record becomes an :class:`Example` that remembers where it came from (``file:line``), so every later
error can name the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..models.hub import looks_like_hub_id, probe_hub
from .bundled import bundled_file

FORMATS = ("alpaca", "messages", "sharegpt", "text", "preference", "prompt", "unpaired")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}

Message = dict[str, str]


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclass
class Example:
    """One normalised record. Which fields are set depends on its kind."""

    source: str  # "path:line" of the record, for error messages
    kind: str  # "chat" | "text" | "preference" | "prompt" | "unpaired"
    messages: list[Message] = field(default_factory=list)  # chat: the conversation; preference/prompt: the prompt
    text: str = ""  # text
    chosen: list[Message] = field(default_factory=list)  # preference: the preferred assistant turn(s)
    rejected: list[Message] = field(default_factory=list)
    completion: list[Message] = field(default_factory=list)  # unpaired: the answer that ``label`` judges
    label: bool | None = None  # unpaired: True for a desirable completion, False for an undesirable one
    fields: dict[str, Any] = field(default_factory=dict)  # the raw record (generate/eval copy fields through)


# -- reading ------------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, row)`` for every record of a data file, with 1-based line / row numbers."""
    p = bundled_file(str(path)) or Path(path)  # `demo`, `demo:eval`, `general`: the sets tuneforge ships
    if not p.exists():
        if _looks_like_hub_id(str(path)):
            yield from _read_hub(str(path))
            return
        raise FileNotFoundError(f"data file not found: {path}")
    if p.is_dir():
        raise DataError(f"{p} is a directory, not a data file (.jsonl, .json, .csv or .parquet)")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(p)
    elif suffix == ".json":
        yield from _read_json(p)
    elif suffix == ".csv":
        yield from _read_csv(p)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist(), start=1):
            yield f"{p}:row {i}", row
    else:
        raise DataError(f"{p}: unsupported data file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


# Files are read with errors="surrogateescape": a byte that is not UTF-8 becomes one lone surrogate, so the
# error can name its line and column instead of a byte offset into the whole file.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _check_utf8(text: str, p: Path, first_line: int = 1) -> None:
    bad = _NOT_UTF8.search(text)
    if bad:
        line = first_line + text.count("\n", 0, bad.start())
        column = bad.start() - text.rfind("\n", 0, bad.start())
        raise DataError(f"{p}:{line}: not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} at column {column}); "
                        "save the file as UTF-8")


def _parse_json(text: str, p: Path, line: int | None = None) -> Any:
    """``text`` parsed; ``line``: the JSONL line it is (else the error names the line inside ``text``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{line or e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer past Python's digit limit; nesting past the stack
        raise DataError(f"{p}{f':{line}' if line else ''}: malformed JSON ({e})") from None


def _read_csv(p: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with p.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        text = f.read()
    _check_utf8(text, p)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            if None in row:  # DictReader files values beyond the header's columns under the key None
                raise DataError(f"{p}:{i}: {len(row[None])} more value(s) than the header has columns")
            yield f"{p}:{i}", row
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: malformed CSV ({e})") from None


def _read_jsonl(p: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with p.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                yield f"{p}:{i}", parse_jsonl_line(line, p, i)


def parse_jsonl_line(line: str, p: Path, i: int) -> dict[str, Any]:
    """Line ``i`` of a JSONL file as its record (``--streaming`` reads lines through datasets and parses them here)."""
    _check_utf8(line, p, i)
    row = _parse_json(line, p, i)
    if not isinstance(row, dict):
        raise DataError(f"{p}:{i}: expected a JSON object, got {type(row).__name__}")
    return row


def _read_json(p: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = p.read_text(encoding="utf-8-sig", errors="surrogateescape")
    _check_utf8(text, p)
    data = _parse_json(text, p)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of records (or {{\"data\": [...]}})")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{p}: record {i}: expected a JSON object, got {type(row).__name__}")
        yield f"{p}:record {i}", row


def _looks_like_hub_id(name: str) -> bool:
    # A dot in the name part reads as a file extension: "data/train.jsonl" is a missing file, not a data set.
    repo = name.split(":", 1)[0]
    return looks_like_hub_id(repo) and "." not in repo.split("/")[-1]


def _read_hub(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    split = "train"
    if ":" in name:
        name, split = name.split(":", 1)
    probe_hub(name, "dataset", "data")  # a quick, clear error before datasets' own slow retries
    for i, row in enumerate(datasets.load_dataset(name, split=split)):
        yield f"{name}[{split}]:row {i}", row


# -- detection and normalisation ----------------------------------------------------------------------


def detect_format(row: dict[str, Any], location: str = "") -> str:
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if "messages" in keys:
        messages = row["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "user":
            return "prompt"
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    raise DataError(
        f"{location}: cannot tell the record's format from its keys {sorted(keys)}; expected one of: "
        "instruction+output (alpaca), messages, conversations (sharegpt), text, prompt+chosen+rejected, "
        "prompt+completion+label (unpaired), prompt"
    )


def normalise(row: dict[str, Any], fmt: str, location: str) -> Example:
    if fmt == "alpaca":
        return _from_alpaca(row, location)
    if fmt == "messages":
        return Example(location, "chat", _messages(row, "messages", location, "role", "content"), fields=row)
    if fmt == "sharegpt":
        return Example(location, "chat", _messages(row, "conversations", location, "from", "value"), fields=row)
    if fmt == "text":
        return Example(location, "text", text=_string(row, "text", location), fields=row)
    if fmt == "preference":
        return _from_preference(row, location)
    if fmt == "prompt":
        return _from_prompt(row, location)
    if fmt == "unpaired":
        return _from_unpaired(row, location)
    raise DataError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")


def _string(row: dict[str, Any], key: str, location: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (empty CSV / parquet cell)
        if required:
            raise DataError(f"{location}: field {key!r} is missing")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{location}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _from_alpaca(row: dict[str, Any], location: str) -> Example:
    instruction = _string(row, "instruction", location)
    extra = _string(row, "input", location, required=False)
    output = _string(row, "output", location)
    messages: list[Message] = []
    system = _string(row, "system", location, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{location}: field 'history' must be a list of [instruction, output] pairs")
    for j, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise DataError(f"{location}: field 'history[{j}]' must be a pair of strings [instruction, output]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Example(location, "chat", messages, fields=row)


def _messages(row: dict[str, Any], key: str, location: str, role_key: str, content_key: str) -> list[Message]:
    raw = row.get(key)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{location}: field {key!r} must be a non-empty list of messages")
    out: list[Message] = []
    for j, m in enumerate(raw):
        where = f"{location}: field '{key}[{j}]'"
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise DataError(f"{where} must be an object with {role_key!r} and {content_key!r}")
        role = SHAREGPT_ROLES.get(str(m[role_key]).lower()) if role_key == "from" else m[role_key]
        if role not in ROLES:
            raise DataError(f"{where}.{role_key}: unknown role {m[role_key]!r}; expected one of {ROLES}")
        if not isinstance(m[content_key], str):
            raise DataError(f"{where}.{content_key} must be a string")
        out.append({"role": role, "content": m[content_key]})
    return out


def _prompt_messages(row: dict[str, Any], location: str) -> list[Message]:
    if "messages" in row and "prompt" not in row:
        return _messages(row, "messages", location, "role", "content")
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return _messages(row, "prompt", location, "role", "content")
    messages = []
    system = _string(row, "system", location, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _string(row, "prompt", location)})
    return messages


def _response(row: dict[str, Any], key: str, location: str) -> list[Message]:
    value = row.get(key)
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        msgs = _messages(row, key, location, "role", "content")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{location}: field {key!r} must end with an assistant message")
        return msgs
    raise DataError(f"{location}: field {key!r} must be a string or a list of messages")


def _from_preference(row: dict[str, Any], location: str) -> Example:
    if "prompt" not in row and "messages" not in row:
        # Conversational form without a prompt key: chosen/rejected are whole conversations sharing a prefix.
        chosen, rejected = _response(row, "chosen", location), _response(row, "rejected", location)
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{location}: field 'prompt' is missing and 'chosen'/'rejected' share no prompt turns")
        return Example(location, "preference", chosen[:n], chosen=chosen[n:], rejected=rejected[n:], fields=row)
    prompt = _prompt_messages(row, location)
    return Example(location, "preference", prompt, chosen=_response(row, "chosen", location),
                   rejected=_response(row, "rejected", location), fields=row)


def _from_prompt(row: dict[str, Any], location: str) -> Example:
    messages = _prompt_messages(row, location)
    if messages[-1]["role"] != "user":
        raise DataError(f"{location}: a prompt record must end with a user message")
    return Example(location, "prompt", messages, fields=row)


def _from_unpaired(row: dict[str, Any], location: str) -> Example:
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # a CSV cell
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise DataError(f"{location}: field 'label' must be true (a desirable completion) or false (an "
                        f"undesirable one), got {label!r}")
    return Example(location, "unpaired", _prompt_messages(row, location),
                   completion=_response(row, "completion", location), label=label, fields=row)


def load_examples(path: str | Path, fmt: str | None = None, limit: int | None = None) -> list[Example]:
    """Read, detect (from the first record unless ``fmt`` is given), validate and normalise a data file."""
    if fmt is not None and fmt not in FORMATS and fmt != "auto":
        raise DataError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
    examples: list[Example] = []
    for location, row in read_rows(path):
        if fmt in (None, "auto"):
            fmt = detect_format(row, location)
        examples.append(normalise(row, fmt, location))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


# -- prompts to answer (generate) ---------------------------------------------------------------------------------

PROMPT_FIELDS = ("instruction", "question", "prompt", "messages", "conversations", "text")


def load_prompts(path: str | Path, fmt: str | None = None) -> list[Example]:
    """Prompts to answer, from the files people have: questions without answers as well as training records.

    Accepted: a ``.txt`` file (one prompt per line); alpaca records with or without ``output``; ``{"question"}``;
    ``{"prompt"}``; chat records (the conversation up to its last assistant turn is the prompt); preference and
    unpaired records (their prompt); ``{"text"}`` (the text as the user turn). Each becomes a ``prompt`` example
    whose ``fields`` are the record, so predictions can be written beside it."""
    if fmt is not None and fmt not in FORMATS and fmt != "auto":
        raise DataError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
    file = bundled_file(str(path)) or Path(path)
    rows = _read_lines(file) if file.suffix.lower() == ".txt" else read_rows(path)
    prompts = [Example(location, "prompt", _prompt_of(row, fmt, location), fields=row) for location, row in rows]
    if not prompts:
        raise DataError(f"{path}: no records")
    return prompts


def _read_lines(p: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = p.read_text(encoding="utf-8-sig", errors="surrogateescape")
    _check_utf8(text, p)
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield f"{p}:{i}", {"prompt": line.strip()}


def _prompt_of(row: dict[str, Any], fmt: str | None, location: str) -> list[Message]:
    if fmt in (None, "auto"):
        if not any(key in row for key in PROMPT_FIELDS + ("chosen", "completion")):
            raise DataError(f"{location}: no prompt in the record's keys {sorted(row)}; expected one of: "
                            f"{', '.join(PROMPT_FIELDS)}")
        fmt = "alpaca" if "instruction" in row else "question" if "question" in row else detect_format(row, location)
    if fmt == "question":
        return _system(row, location) + [{"role": "user", "content": _string(row, "question", location)}]
    if fmt == "alpaca":  # the answer is optional here: it is what is to be generated
        return _from_alpaca({**row, "output": row.get("output") or ""}, location).messages[:-1]
    if fmt == "text":
        return [{"role": "user", "content": _string(row, "text", location)}]
    messages = normalise(row, fmt, location).messages
    while messages and messages[-1]["role"] == "assistant":  # a chat record: answer its last user turn anew
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{location}: the conversation has no user turn to answer")
    return messages


def _system(row: dict[str, Any], location: str) -> list[Message]:
    system = _string(row, "system", location, required=False)
    return [{"role": "system", "content": system}] if system else []


def examples_of_kind(examples: Iterable[Example], kinds: tuple[str, ...], purpose: str) -> list[Example]:
    """Check every example suits ``purpose`` (e.g. SFT needs chat records), naming the first that does not."""
    out = list(examples)
    for ex in out:
        if ex.kind not in kinds:
            raise DataError(f"{ex.source}: a {ex.kind!r} record cannot be used for {purpose} (needs {kinds})")
    return out
