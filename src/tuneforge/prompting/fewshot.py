"""Choosing few-shot examples, and binding a template to its example pool.

Similarity is TF-IDF cosine over word unigrams, word bigrams and character trigrams (the trigrams make
"translate" and "translation" neighbours); dependency-free and fast enough for pools of thousands.
The query record itself (anything whose filled instruction equals the query's) is never its own example,
so leave-one-out evaluation on a labelled set does not leak the answer.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

from .template import Message, PromptTemplate, Record, TemplateError

_WORD = re.compile(r"\w+", re.UNICODE)


def tfidf_features(text: str) -> Counter:
    """Term counts: ``w:word``, ``b:word word`` and ``c:tri`` (char trigrams of each padded word)."""
    words = [w.casefold() for w in _WORD.findall(text)]
    features: Counter = Counter(f"w:{w}" for w in words)
    features.update(f"b:{a} {b}" for a, b in zip(words, words[1:]))
    for word in words:
        padded = f" {word} "
        features.update(f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2))
    return features


class TfidfIndex:
    """Cosine similarity of a query against a fixed list of texts, with smoothed IDF from those texts."""

    def __init__(self, texts: Sequence[str]):
        counts = [tfidf_features(t) for t in texts]
        df: Counter = Counter(term for c in counts for term in c)
        n = len(texts)
        # sklearn's smooth idf: log((1 + n) / (1 + df)) + 1 keeps every term's weight positive.
        self.idf = {term: math.log((1 + n) / (1 + d)) + 1.0 for term, d in df.items()}
        self.vectors = [self._vector(c) for c in counts]

    def _vector(self, counts: Counter) -> dict[str, float]:
        weights = {t: (1.0 + math.log(c)) * self.idf[t] for t, c in counts.items() if t in self.idf}
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        return {t: w / norm for t, w in weights.items()}

    def similarities(self, query: str) -> list[float]:
        """Cosine similarity of ``query`` to every indexed text (terms unseen in the pool are ignored)."""
        q = self._vector(tfidf_features(query))
        return [sum(w * vec.get(t, 0.0) for t, w in q.items()) for vec in self.vectors]


class PromptBuilder:
    """A template bound to its few-shot pool: ``builder(record)`` returns the chat messages for ``record``.

    ``pool`` is used when the template names no ``fewshot.data`` file (prompt evaluation passes the evaluated
    records, so few-shot becomes leave-one-out).
    """

    def __init__(self, template: PromptTemplate, pool: Sequence[Record] | None = None, answer_field: str = "output"):
        self.template = template
        self.answer_field = answer_field
        self.pool: list[Record] = []
        self._index: TfidfIndex | None = None
        fewshot = template.fewshot
        if fewshot is None or fewshot.k == 0:
            return
        self.pool = _load_pool(template) if fewshot.data else list(pool or [])
        if not self.pool:
            raise TemplateError(f"{template.where()}: few-shot examples requested but the example pool is empty")
        self._pool_texts = [self._pool_text(i, r) for i, r in enumerate(self.pool)]
        self._pool_keys = [_identity(t) for t in self._pool_texts]
        if fewshot.strategy == "similar":
            self._index = TfidfIndex(self._pool_texts)

    def _pool_text(self, i: int, example: Record) -> str:
        try:
            return self.template.query_text(example)
        except TemplateError as e:
            raise TemplateError(f"few-shot example {i}: {e}") from None

    def select(self, record: Record) -> list[Record]:
        """The few-shot examples for ``record``, in prompt order."""
        fewshot = self.template.fewshot
        if fewshot is None or fewshot.k == 0:
            return []
        query = self.template.query_text(record)
        key = _identity(query)
        candidates = [i for i, k in enumerate(self._pool_keys) if k != key]
        if fewshot.strategy == "first":
            chosen = candidates[: fewshot.k]
        elif fewshot.strategy == "random":
            # Seeded by (seed, query): reproducible across runs, yet each query gets its own draw.
            rng = random.Random(f"{fewshot.seed}\x00{query}")
            chosen = rng.sample(candidates, min(fewshot.k, len(candidates)))
        else:
            assert self._index is not None
            scores = self._index.similarities(query)
            ranked = sorted(candidates, key=lambda i: (-scores[i], i))[: fewshot.k]
            chosen = list(reversed(ranked))  # the most similar example sits last, right before the query
        return [self.pool[i] for i in chosen]

    def __call__(self, record: Record) -> list[Message]:
        return self.template.render(record, self.select(record), answer_field=self.answer_field)


def _identity(text: str) -> str:
    return " ".join(text.casefold().split())


def _load_pool(template: PromptTemplate) -> list[Record]:
    from tuneforge.data.formats import read_rows

    assert template.fewshot is not None and template.fewshot.data is not None
    path = Path(template.fewshot.data).expanduser()
    if not path.is_absolute() and template.source:
        path = Path(template.source).parent / path
    if not path.exists():
        raise TemplateError(f"{template.where()}: fewshot.data file not found: {path}")
    return [row for _, row in read_rows(path)]
