"""``--key value`` command-line flags as config values: how `tuneforge train` reads its flags (``commands/main.py``)
and how the
commands that pass flags on to it read them (``compare`` splits them per method and builds each method's config
before anything trains). A library module, so that compare need not import the CLI (tests/test_layers.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def parse_value(text: str) -> Any:
    """``16`` → 16, ``1e-4`` → 0.0001, ``true`` → True, ``null`` → None, ``q_proj,v_proj`` or ``[a, b]`` → list.

    Anything else stays the string it is: free text such as a prompt-tuning init text ("Sentiment: yes, no")
    must reach the config unchanged, so only the unambiguous forms above are converted.
    """
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.startswith(("[", "{")):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, (list, dict)) else text
    if "," in text and not any(c.isspace() for c in text):
        return [parse_value(part) for part in text.split(",") if part]
    return text


def flag_groups(tokens: list[str]) -> list[list[str]]:
    """The tokens of each flag together: ``[--key, value]``, ``[--key=value]`` or a bare ``[--flag]`` (true)."""
    groups: list[list[str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r} (options look like --key value)")
        if "=" not in token and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            groups.append([token, tokens[i + 1]])
            i += 2
        else:
            groups.append([token])
            i += 1
    return groups


def flag_key(group: list[str]) -> str:
    """The config key a flag group sets: ``--lora-r`` → ``lora_r``."""
    return group[0][2:].partition("=")[0].replace("-", "_")


def flag_value(group: list[str]) -> Any:
    token = group[0]
    if "=" in token:
        return parse_value(token.partition("=")[2])
    return parse_value(group[1]) if len(group) > 1 else True


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / bare ``--flag`` (true) pairs, in order."""
    out: dict[str, Any] = {}
    for group in flag_groups(tokens):
        key, value = flag_key(group), flag_value(group)
        if key == "data" and key in out:  # --data a.jsonl:0.8 --data b.jsonl:0.2: a mix of sources
            out[key] = [*(out[key] if isinstance(out[key], list) else [out[key]]), value]
        else:
            out[key] = value
    return out


__all__ = ["flag_groups", "flag_key", "flag_value", "parse_overrides", "parse_value"]


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; a missing file, bad YAML or a non-mapping is one line naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return data
