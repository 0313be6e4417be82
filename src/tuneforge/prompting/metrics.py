"""Scoring a model answer against a reference.

A metric is ``fn(prediction, reference) -> float`` in [0, 1]. Specs the CLI accepts:

* ``exact``            normalised prediction == normalised reference (see :func:`normalize_answer`)
* ``contains``         the normalised reference occurs in the normalised prediction
* ``regex:PATTERN``    ``re.search(PATTERN, prediction)``; ``{answer}`` in PATTERN becomes the escaped reference
* ``module:function``  any importable function, or ``path/to/file.py:function``

A reference may be a list of acceptable answers; the score is the best over them.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import string
import unicodedata
from pathlib import Path
from typing import Any, Callable

Metric = Callable[[str, str], float]

# Trailing/leading punctuation and quotes a model adds around an answer ("Paris." / "**Paris**" / "'Paris'").
_EDGE_PUNCT = string.punctuation + "“”‘’«»。，、！？：；"


def normalize_answer(text: str) -> str:
    """Canonical form for matching: Unicode NFKC, case-folded, whitespace collapsed to single spaces,
    punctuation and quotes stripped from both ends (inner punctuation kept: "3.14", "e-mail" survive)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    return text.strip(_EDGE_PUNCT + " ")


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def contains_match(prediction: str, reference: str) -> float:
    ref = normalize_answer(reference)
    return float(bool(ref) and ref in normalize_answer(prediction))


def regex_metric(pattern: str) -> Metric:
    """1.0 when ``pattern`` is found in the prediction; ``{answer}`` stands for the escaped reference."""
    if "{answer}" not in pattern:
        compiled = _compile(pattern)
        return lambda prediction, reference: float(compiled.search(prediction) is not None)

    def score(prediction: str, reference: str) -> float:
        return float(re.search(pattern.replace("{answer}", re.escape(reference)), prediction) is not None)

    _compile(pattern.replace("{answer}", "x"))  # fail now, not on the first record
    return score


def load_metric(spec: str) -> tuple[str, Metric]:
    """``(display name, function)`` for a metric spec (see the module docstring)."""
    if spec == "exact":
        return "exact", exact_match
    if spec == "contains":
        return "contains", contains_match
    if spec.startswith("regex:"):
        return "regex", regex_metric(spec[len("regex:"):])
    if ":" in spec:
        module_name, _, function_name = spec.rpartition(":")
        return function_name, _import_function(module_name, function_name, spec)
    raise ValueError(f"unknown metric {spec!r}; use exact, contains, regex:PATTERN or module:function")


def score(metric: Metric, prediction: str, reference: Any) -> float:
    """Apply ``metric``; a list reference means any of its answers counts (the best score wins)."""
    references = reference if isinstance(reference, (list, tuple)) else [reference]
    if not references:
        raise ValueError("empty list of reference answers")
    return max(float(metric(prediction, str(ref))) for ref in references)


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"metric regex {pattern!r} is invalid: {e}") from None


def _import_function(module_name: str, function_name: str, spec: str) -> Metric:
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or not path.is_file():
                raise ImportError(f"no such file {path}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"metric {spec!r}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"metric {spec!r}: {module_name!r} has no function {function_name!r}")
    return fn
