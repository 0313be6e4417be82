"""Turning teacher replies into records, and the filters a record passes before it is written.

Parsing is forgiving about *where* the JSON is (bare, in a code fence, after a preamble) and about key names
(``question``/``instruction``, ``answer``/``response``), and strict about *what* it holds: non-empty strings.

Duplicates are found on the question text after normalisation (case, punctuation, spacing): equal texts
are exact duplicates; texts whose character 5-gram sets have Jaccard similarity >= threshold are near
duplicates. Candidates come from MinHash LSH, then the true Jaccard is checked, so the cost stays about linear.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from typing import Any

QUESTION_KEYS = ("question", "instruction", "prompt", "q")
ANSWER_KEYS = ("answer", "response", "output", "chosen", "a")
REJECTED_KEYS = ("rejected", "worse_answer", "bad_answer", "wrong_answer", "rejected_answer")

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_LABELLED = re.compile(
    r"question\s*[:：]\s*(?P<question>.+?)\n\s*answer\s*[:：]\s*(?P<answer>.+?)"
    r"(?:\n\s*(?:worse|rejected|bad)[ _]answer\s*[:：]\s*(?P<rejected>.+))?\s*$",
    re.IGNORECASE | re.DOTALL,
)


class ReplyFormatError(ValueError):
    """A teacher reply holds no usable record."""


def extract_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text``: the whole text, a fenced block, or one embedded in prose."""
    candidates = [text.strip(), *(block.strip() for block in _FENCE.findall(text))]
    for candidate in candidates:
        found = _as_object(_loads(candidate))
        if found is not None:
            return found
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"[{\[]", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        found = _as_object(value)
        if found is not None:
            return found
    return None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _as_object(value: Any) -> dict[str, Any] | None:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[0]  # a teacher that wrapped its one item in a list
    return value if isinstance(value, dict) else None


def parse_qa_reply(text: str, with_rejected: bool = False) -> dict[str, str]:
    """``{"question", "answer"[, "rejected"]}`` from a teacher reply, or :class:`ReplyFormatError`."""
    obj = extract_json_object(text)
    if obj is None:
        match = _LABELLED.search(text.strip())
        if match is None:
            raise ReplyFormatError("no JSON object and no 'Question: ... Answer: ...' lines in the reply")
        obj = {k: v for k, v in match.groupdict().items() if v is not None}
    record = {"question": _field(obj, QUESTION_KEYS, "question"), "answer": _field(obj, ANSWER_KEYS, "answer")}
    if with_rejected:
        record["rejected"] = _field(obj, REJECTED_KEYS, "rejected")
        if normalize_text(record["rejected"]) == normalize_text(record["answer"]):
            raise ReplyFormatError("the rejected answer is the same as the chosen one")
    return record


def _field(obj: dict[str, Any], keys: tuple[str, ...], name: str) -> str:
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for key in keys:
        value = lowered.get(key)
        if value is None:
            continue
        # A structured answer (the teacher put a JSON object where a string belongs) is kept as JSON text.
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if text.strip():
            return text.strip()
    raise ReplyFormatError(f"the reply has no non-empty {name!r} field (looked for {', '.join(keys)})")


def parse_judge_score(text: str) -> float | None:
    """A 1-10 score from a judge reply: ``{"score": 7}``, ``Score: 7``, ``7/10`` or a bare ``7``."""
    obj = extract_json_object(text)
    candidates: list[Any] = [obj.get("score"), obj.get("rating")] if obj else []
    for pattern in (r"(?i)\b(?:score|rating)\W{0,3}(\d+(?:\.\d+)?)", r"\b(\d+(?:\.\d+)?)\s*/\s*10\b",
                    r"^\s*(\d+(?:\.\d+)?)\s*$"):
        match = re.search(pattern, text)
        if match:
            candidates.append(match.group(1))
    for value in candidates:
        try:
            score = float(value)
        except (TypeError, ValueError):
            continue
        if 1 <= score <= 10:
            return score
    return None


def normalize_text(text: str) -> str:
    """Case-folded, punctuation-free, single-spaced text: the form duplicates are compared in."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def check_lengths(record: dict[str, str], min_answer_chars: int, max_answer_chars: int,
                  max_question_chars: int) -> str | None:
    """Why the record's lengths are out of bounds, or None."""
    answer, question = record["answer"], record["question"]
    if len(answer) < min_answer_chars:
        return f"answer has {len(answer)} chars < {min_answer_chars}"
    if len(answer) > max_answer_chars:
        return f"answer has {len(answer)} chars > {max_answer_chars}"
    if len(question) > max_question_chars:
        return f"question has {len(question)} chars > {max_question_chars}"
    return None


def check_answer_format(answer: str, answer_format: str = "text", answer_regex: str | None = None) -> str | None:
    """Why the answer fails ``--answer-format`` / ``--answer-regex`` (a full match), or None."""
    if answer_format == "json":
        try:
            json.loads(answer)
        except json.JSONDecodeError as e:
            return f"answer is not valid JSON ({e.msg})"
    if answer_regex is not None and re.fullmatch(answer_regex, answer, flags=re.DOTALL) is None:
        return "answer does not match --answer-regex"
    return None


class DuplicateIndex:
    """Remembers kept texts; :meth:`check_and_add` says whether a new text duplicates one of them."""

    _PRIME = (1 << 61) - 1

    def __init__(self, threshold: float = 0.85, shingle: int = 5, num_perm: int = 64):
        if not 0 < threshold <= 1:
            raise ValueError("near-duplicate threshold must be in (0, 1]")
        self.threshold, self.shingle, self.num_perm = threshold, shingle, num_perm
        self.rows = self._rows_per_band(threshold, num_perm)
        rng = random.Random(1234)  # fixed: signatures must agree between runs that resume each other
        self._perms = [(rng.randrange(1, self._PRIME), rng.randrange(0, self._PRIME)) for _ in range(num_perm)]
        self._exact: set[str] = set()
        self._shingles: list[set[str]] = []
        self._buckets: dict[tuple, list[int]] = {}

    @staticmethod
    def _rows_per_band(threshold: float, num_perm: int) -> int:
        # LSH catches pairs above ~ (1/bands)^(1/rows); keep that well below the threshold for high recall.
        for rows in range(8, 0, -1):
            if (1 / (num_perm // rows)) ** (1 / rows) <= 0.7 * threshold:
                return rows
        return 1

    def check_and_add(self, text: str) -> str | None:
        """``"exact"`` or ``"near"`` if ``text`` duplicates a kept text; otherwise keep it and return None."""
        norm = normalize_text(text)
        key = hashlib.sha1(norm.encode("utf-8")).hexdigest()
        if key in self._exact:
            return "exact"
        shingles = self._shingle_set(norm)
        bands = self._bands(shingles)
        candidates = {i for band in bands for i in self._buckets.get(band, ())}
        if any(_jaccard(shingles, self._shingles[i]) >= self.threshold for i in candidates):
            return "near"
        self._exact.add(key)
        self._shingles.append(shingles)
        for band in bands:
            self._buckets.setdefault(band, []).append(len(self._shingles) - 1)
        return None

    def _shingle_set(self, norm: str) -> set[str]:
        if len(norm) <= self.shingle:
            return {norm}
        return {norm[i:i + self.shingle] for i in range(len(norm) - self.shingle + 1)}

    def _bands(self, shingles: set[str]) -> list[tuple]:
        hashes = [int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "big")
                  for s in shingles]
        signature = [min((a * h + b) % self._PRIME for h in hashes) for a, b in self._perms]
        r = self.rows
        return [(i, tuple(signature[i * r:(i + 1) * r])) for i in range(self.num_perm // r)]


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0
