"""What synthetic data is written about: topics from a text file, or chunks of the user's documents, and the
plan of generation jobs over them.

Every job has a deterministic id (a hash of the source, the variation number and the run's format/template),
so a rerun of the same command plans the same ids and resumes by skipping those already done. Raising
``--count`` later adds new ids and keeps the old ones.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown")

# Each further job on the same source asks for a different kind of question, so a topic's 10 jobs do not
# come back as the same question reworded 10 times (the near-duplicate filter would drop those anyway).
ASPECTS = (
    "a basic definition or core concept",
    "a practical how-to or procedure",
    "a comparison or trade-off between alternatives",
    "a common mistake or misconception",
    "a concrete worked example",
    "a why-question about causes or reasons",
    "an edge case or limitation",
    "a troubleshooting scenario",
)


@dataclass(frozen=True)
class Source:
    """One thing to write about. ``variables`` fill the teacher prompt; ``provenance`` goes to ``meta.source``."""

    key: str
    variables: dict[str, Any] = field(hash=False)
    provenance: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class Job:
    id: str
    source: Source
    variation: int  # 0 for the first job on this source, 1 for the next ...

    @property
    def aspect(self) -> str:
        return ASPECTS[self.variation % len(ASPECTS)]

    def variables(self) -> dict[str, Any]:
        """The fields the teacher-prompt template is filled from."""
        return {**self.source.variables, "aspect": self.aspect, "variation": self.variation + 1}


def read_topics(path: str | Path) -> list[Source]:
    """One topic per line; blank lines and ``#`` comments are ignored, repeated topics kept once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"topics file not found: {path}")
    seen: dict[str, Source] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        topic = line.strip()
        if topic and not topic.startswith("#") and topic not in seen:
            seen[topic] = Source(key=f"topic:{topic}", variables={"topic": topic}, provenance={"topic": topic})
    if not seen:
        raise ValueError(f"{path}: no topics (one per line; '#' starts a comment)")
    return list(seen.values())


def read_documents(directory: str | Path, chunk_chars: int = 2000) -> list[Source]:
    """Every .txt/.md file under ``directory`` (sorted, recursive), cut into chunks of at most ``chunk_chars``."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"documents directory not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no {'/'.join(DOCUMENT_SUFFIXES)} files")
    sources = []
    for path in files:
        relative = path.relative_to(root).as_posix()
        for index, chunk in enumerate(chunk_text(path.read_text(encoding="utf-8", errors="replace"), chunk_chars)):
            digest = hashlib.sha1(chunk.encode("utf-8")).hexdigest()[:10]  # an edited chunk is a new job
            sources.append(Source(
                key=f"doc:{relative}#{index}:{digest}",
                variables={"context": chunk, "source_file": relative},
                provenance={"file": relative, "chunk": index},
            ))
    return sources


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Pack whole paragraphs into chunks of at most ``max_chars``; split only paragraphs that alone exceed it
    (at sentence ends, else at spaces), so a chunk rarely starts mid-thought."""
    if max_chars < 100:
        raise ValueError("chunk size must be at least 100 characters")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    pieces = [piece for p in paragraphs for piece in _split_long(p, max_chars)]
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def _split_long(paragraph: str, max_chars: int) -> list[str]:
    out = []
    while len(paragraph) > max_chars:
        window = paragraph[:max_chars]
        cut = max(window.rfind(". "), window.rfind("! "), window.rfind("? "))
        cut = cut + 1 if cut > max_chars // 2 else window.rfind(" ")
        if cut <= 0:
            cut = max_chars  # one enormous word: a hard cut is all that is left
        out.append(paragraph[:cut].strip())
        paragraph = paragraph[cut:].strip()
    return out + ([paragraph] if paragraph else [])


def plan_jobs(sources: Sequence[Source], count: int | None, salt: str) -> list[Job]:
    """``count`` jobs round-robin over ``sources`` (default: one per source). ``salt`` (output format and
    template) is part of every id, so a different prompt never mistakes another run's records for its own."""
    if not sources:
        return []
    total = len(sources) if count is None else count
    jobs = []
    for i in range(total):
        source, variation = sources[i % len(sources)], i // len(sources)
        digest = hashlib.sha1(f"{salt}\x00{source.key}\x00{variation}".encode("utf-8")).hexdigest()[:16]
        jobs.append(Job(id=digest, source=source, variation=variation))
    return jobs
