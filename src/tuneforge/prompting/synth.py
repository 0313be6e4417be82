"""Teacher-written training data: plan jobs, ask the teacher, filter, and append what survives.

The loop works through the pending jobs in windows (about two per request slot). Per window: all generation
requests run concurrently; replies are parsed and pass the cheap filters (format, length, answer format);
survivors go to the judge, if one is asked for; then, in job order, the duplicate filter runs and each record
is appended and fsynced. Processing a window in job order keeps the output deterministic for a
deterministic teacher, whatever the request timing.

Resume: kept records carry their job id in ``meta.job_id``; dropped jobs are logged with their reply in
``<output>.jobs.jsonl``. On start both are read and those jobs skipped, so an interrupted run continues where
it stopped and never writes a job twice. Failed jobs (requests that exhausted their retries) are in neither
file, so a rerun retries them. To re-filter dropped jobs with new settings, delete the ``.jobs.jsonl`` file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

from ..run.checkpoint import write_text_atomic
from .filters import (DuplicateIndex, ReplyFormatError, check_answer_format, check_lengths, parse_judge_score,
                      parse_qa_reply)
from .jsonl import JsonlLog
from .sources import Job, Source, plan_jobs
from .template import Message, PromptTemplate, load_template

DROP_REASONS = ("format", "length", "answer_format", "judge", "duplicate_exact", "duplicate_near")


class Teacher(Protocol):
    concurrency: int
    requests_sent: int
    retries: int

    @property
    def name(self) -> str: ...

    def provenance(self) -> dict[str, Any]: ...

    def complete_many(self, prompts: Sequence[Sequence[Message]], *, temperature: float,
                      max_tokens: int) -> list[Any]: ...


@dataclass
class SynthConfig:
    """How records are generated and which survive. Lengths are in characters."""

    output: Path
    count: int | None = None  # jobs planned round-robin over the sources; None: one per source
    format: Literal["sft", "preference"] = "sft"  # alpaca records, or prompt/chosen/rejected pairs
    template: PromptTemplate | None = None  # the teacher prompt; default: synth_topic / synth_document
    judge_template: PromptTemplate | None = None  # default: synth_judge
    temperature: float = 0.8  # some diversity between jobs on the same source
    max_tokens: int = 768  # per teacher reply; JSON with a chosen and a rejected answer needs room
    include_context: bool = False  # documents: put the chunk in `input` (reading-comprehension style)
    min_answer_chars: int = 2
    max_answer_chars: int = 4000
    max_question_chars: int = 1000
    answer_format: Literal["text", "json"] = "text"  # json: the answer must parse as JSON
    answer_regex: str | None = None  # the answer must match this entirely
    dedup: bool = True
    near_dup_threshold: float = 0.85  # Jaccard of character 5-grams of the normalised questions
    judge_threshold: float | None = None  # keep records the teacher-judge scores >= this (1-10); None: no judge
    max_jobs: int | None = None  # process at most this many pending jobs in this run (then stop; rerun resumes)
    window: int | None = None  # jobs per window; default 2 x the teacher's concurrency
    overwrite: bool = False  # start over: remove the output, its job ledger and summary first

    @property
    def jobs_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".jobs.jsonl")

    @property
    def summary_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".summary.json")


@dataclass
class SynthSummary:
    """What one run did. ``kept + sum(dropped) + failed == attempted``."""

    output: str
    format: str
    teacher: dict[str, Any]
    template: str
    planned: int = 0
    already_done: int = 0  # jobs finished (kept or dropped) by earlier runs, skipped now
    attempted: int = 0
    generated: int = 0  # teacher replies received
    failed: int = 0  # jobs whose request exhausted its retries; a rerun retries them
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    kept: int = 0
    total_in_output: int = 0
    remaining: int = 0  # planned jobs still not done (failed, or beyond --max-jobs)
    requests_sent: int = 0
    retries: int = 0
    repaired_bytes: int = 0  # a torn last line cut from the output by crash repair
    wall_seconds: float = 0.0
    status: str = "running"
    failed_jobs: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # what the kept records depend on (a rerun must match)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def describe(self) -> str:
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "none"
        lines = [
            f"synth {self.status}: {self.output}",
            f"  jobs: planned {self.planned}, already done {self.already_done}, attempted now {self.attempted}, "
            f"remaining {self.remaining}",
            f"  teacher replies {self.generated}, failed requests {self.failed} "
            f"(requests sent {self.requests_sent}, retries {self.retries})",
            f"  dropped: {dropped}",
            f"  kept {self.kept} (output now holds {self.total_in_output} records)",
        ]
        if self.failed:
            lines.append(f"  {self.failed} job(s) failed; rerun the same command to retry them")
        return "\n".join(lines)


@dataclass
class _Candidate:
    job: Job
    reply: str = ""
    record: dict[str, str] | None = None
    judge_score: float | None = None
    drop: tuple[str, str] | None = None  # (filter, reason)
    error: str | None = None  # the request failed


def output_format_instructions(fmt: str, answer_format: str = "text") -> str:
    """The explicit reply format the teacher is asked for (what :func:`parse_qa_reply` reads)."""
    answer_note = (' The value of "answer" must itself be valid JSON (an object or array), not prose.'
                   if answer_format == "json" else "")
    if fmt == "preference":
        return (
            "Reply with exactly one JSON object and nothing else:\n"
            '{"question": "<the question>", "answer": "<the best answer you can write>", '
            '"rejected": "<a deliberately worse answer>"}\n'
            "The rejected answer must look plausible and fluent, yet be clearly worse: it contains a factual "
            "error, skips a key step, or is vague and unhelpful. Do not label it as worse." + answer_note)
    return ("Reply with exactly one JSON object and nothing else:\n"
            '{"question": "<the question>", "answer": "<the answer>"}' + answer_note)


def synthesize(sources: Sequence[Source], teacher: Teacher, config: SynthConfig) -> SynthSummary:
    """Plan ``config.count`` jobs over ``sources``, run the pending ones through ``teacher`` and the filters,
    and append kept records to ``config.output``. Writes and returns the summary (also when interrupted or
    stopped by an error). Job ids depend on the source, the variation, the format and the template name."""
    kind = "document" if any("context" in s.variables for s in sources) else "topic"
    template = config.template or load_template(f"synth_{kind}")
    judge = config.judge_template or load_template("synth_judge")
    jobs = plan_jobs(sources, config.count, salt=f"{config.format}|{template.label}")
    settings = _settings(config, teacher, template, judge)
    summary = SynthSummary(output=str(config.output), format=config.format, teacher=teacher.provenance(),
                           template=template.label, planned=len(jobs), settings=settings)
    if config.overwrite:
        for path in (config.output, config.jobs_path, config.summary_path):
            path.unlink(missing_ok=True)
    start = time.perf_counter()
    with JsonlLog(config.output) as out, JsonlLog(config.jobs_path) as ledger:
        _check_existing_format(out.records, config)
        _check_same_settings(out.records, config, settings)
        done = {_job_id(r) for r in out.records} | {r.get("id") for r in ledger.records}
        pending = [j for j in jobs if j.id not in done]
        summary.already_done = len(jobs) - len(pending)
        summary.repaired_bytes = out.repaired_bytes
        summary.total_in_output = len(out.records)
        if config.max_jobs is not None:
            pending = pending[: config.max_jobs]
        dedup = _seeded_dedup(out.records, config)
        run = _Run(teacher, config, template, judge, dedup, out, ledger, summary)
        try:
            run.process(pending)
            summary.status = "complete" if summary.already_done + summary.kept + _n_dropped(summary) \
                == len(jobs) else "incomplete"
        except BaseException as e:  # the summary must say what happened, even on Ctrl-C
            summary.status = f"aborted: {type(e).__name__}: {e}"
            raise
        finally:
            summary.remaining = len(jobs) - summary.already_done - summary.kept - _n_dropped(summary)
            summary.requests_sent, summary.retries = teacher.requests_sent, teacher.retries
            summary.wall_seconds = round(time.perf_counter() - start, 3)
            _write_summary(config.summary_path, summary)
    return summary


class _Run:
    """The state of one synthesize() call: teacher, filters, and the two append-only files."""

    def __init__(self, teacher, config, template, judge, dedup, out, ledger, summary):
        self.teacher, self.config, self.template, self.judge = teacher, config, template, judge
        self.dedup, self.out, self.ledger, self.summary = dedup, out, ledger, summary
        self.output_format = output_format_instructions(config.format, config.answer_format)

    def process(self, pending: Sequence[Job]) -> None:
        window = self.config.window or max(1, self.teacher.concurrency) * 2
        progress = _progress(len(pending))
        for begin in range(0, len(pending), window):
            batch = [_Candidate(job) for job in pending[begin:begin + window]]
            self._generate(batch)
            if self.config.judge_threshold is not None:
                self._judge([c for c in batch if c.record is not None and c.drop is None])
            for candidate in batch:
                self._finish(candidate)
            progress.update(len(batch))
            progress.set_postfix(kept=self.summary.kept, dropped=_n_dropped(self.summary), failed=self.summary.failed)
        progress.close()

    def _generate(self, batch: list[_Candidate]) -> None:
        prompts = [self.template.render({**c.job.variables(), "output_format": self.output_format}) for c in batch]
        replies = self.teacher.complete_many(prompts, temperature=self.config.temperature,
                                             max_tokens=self.config.max_tokens)
        for candidate, reply in zip(batch, replies):
            self.summary.attempted += 1
            if isinstance(reply, Exception):
                candidate.error = str(reply)
                continue
            self.summary.generated += 1
            candidate.reply = reply
            try:
                candidate.record = parse_qa_reply(reply, with_rejected=self.config.format == "preference")
            except ReplyFormatError as e:
                candidate.drop = ("format", str(e))
                continue
            candidate.drop = self._cheap_filters(candidate.record)

    def _cheap_filters(self, record: dict[str, str]) -> tuple[str, str] | None:
        c = self.config
        reason = check_lengths(record, c.min_answer_chars, c.max_answer_chars, c.max_question_chars)
        if reason:
            return ("length", reason)
        reason = check_answer_format(record["answer"], c.answer_format, c.answer_regex)
        return ("answer_format", reason) if reason else None

    def _judge(self, candidates: list[_Candidate]) -> None:
        if not candidates:
            return
        prompts = [self.judge.render({"question": c.record["question"], "answer": c.record["answer"],
                                      "reference": c.job.source.variables.get("context")
                                      or "(none: judge with your own knowledge)"}) for c in candidates]
        replies = self.teacher.complete_many(prompts, temperature=0.0, max_tokens=128)
        for candidate, reply in zip(candidates, replies):
            if isinstance(reply, Exception):
                candidate.error = f"judge request: {reply}"
                continue
            score = parse_judge_score(reply)
            candidate.judge_score = score
            if score is None:
                candidate.drop = ("judge", f"unparseable judge reply: {reply[:200]!r}")
            elif score < self.config.judge_threshold:
                candidate.drop = ("judge", f"judge score {score:g} < {self.config.judge_threshold:g}")

    def _finish(self, candidate: _Candidate) -> None:
        """Count the candidate, then append it to the output (kept) or the ledger (dropped); failed: neither."""
        if candidate.error is not None:
            self.summary.failed += 1
            self.summary.failed_jobs.append({"id": candidate.job.id, "error": candidate.error})
            return
        if candidate.drop is None and self.dedup is not None:
            duplicate = self.dedup.check_and_add(candidate.record["question"])
            if duplicate:
                candidate.drop = (f"duplicate_{duplicate}", "question duplicates a kept record")
        if candidate.drop is not None:
            name, reason = candidate.drop
            self.summary.dropped[name] += 1
            self.ledger.append({"id": candidate.job.id, "status": "dropped", "filter": name, "reason": reason,
                                "reply": candidate.reply})
            return
        self.out.append(self._record(candidate))
        self.summary.kept += 1
        self.summary.total_in_output += 1

    def _record(self, candidate: _Candidate) -> dict[str, Any]:
        job, qa = candidate.job, candidate.record
        context = job.source.variables.get("context") if self.config.include_context else None
        meta = {"job_id": job.id, "teacher": self.teacher.provenance(), "template": self.template.label,
                "source": job.source.provenance, "aspect": job.aspect, "judge_score": candidate.judge_score}
        if self.config.format == "preference":
            prompt = f"{qa['question']}\n\nContext:\n{context}" if context else qa["question"]
            if context:
                meta["question"] = qa["question"]  # what the duplicate filter compares on resume
            return {"prompt": prompt, "chosen": qa["answer"], "rejected": qa["rejected"], "meta": meta}
        return {"instruction": qa["question"], "input": context or "", "output": qa["answer"], "meta": meta}


def _job_id(record: dict[str, Any]) -> str | None:
    meta = record.get("meta")
    return meta.get("job_id") if isinstance(meta, dict) else None


def _question_of(record: dict[str, Any]) -> str:
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    return meta.get("question") or record.get("instruction") or record.get("prompt") or ""


def _seeded_dedup(existing: list[dict[str, Any]], config: SynthConfig) -> DuplicateIndex | None:
    """A duplicate index that already knows the records of earlier runs."""
    if not config.dedup:
        return None
    index = DuplicateIndex(config.near_dup_threshold)
    for record in existing:
        index.check_and_add(_question_of(record))
    return index


def _check_existing_format(existing: list[dict[str, Any]], config: SynthConfig) -> None:
    if not existing:
        return
    is_preference = "chosen" in existing[0]
    if is_preference != (config.format == "preference"):
        held = "preference" if is_preference else "sft"
        raise ValueError(f"{config.output} already holds {held} records; this run writes {config.format}: "
                         "use another --output")


def _settings(config: SynthConfig, teacher: Teacher, template: PromptTemplate, judge: PromptTemplate
              ) -> dict[str, Any]:
    """Everything a kept record depends on: records written under other settings must not be resumed into."""
    provenance = teacher.provenance()
    return {"teacher": provenance.get("model"), "format": config.format, "template": template.label,
            "judge_template": judge.label if config.judge_threshold is not None else None,
            "temperature": config.temperature, "max_tokens": config.max_tokens,
            "include_context": config.include_context, "min_answer_chars": config.min_answer_chars,
            "max_answer_chars": config.max_answer_chars, "max_question_chars": config.max_question_chars,
            "answer_format": config.answer_format, "answer_regex": config.answer_regex, "dedup": config.dedup,
            "near_dup_threshold": config.near_dup_threshold, "judge_threshold": config.judge_threshold}


def _check_same_settings(existing: list[dict[str, Any]], config: SynthConfig, settings: dict[str, Any]) -> None:
    """Resume only what this command would itself have written: our records, made with the same settings."""
    if not existing:
        return
    if any(_job_id(r) is None for r in existing):
        raise ValueError(f"{config.output} holds records tuneforge synth did not write (no meta.job_id); choose "
                         "another --output, or pass --overwrite to replace it")
    try:
        before = json.loads(config.summary_path.read_text()).get("settings")
    except (OSError, ValueError):
        before = None
    if not before:  # written before settings were recorded: nothing to compare with
        return
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
    if changed:
        raise ValueError(f"{config.output} was written with other settings ({', '.join(changed)}); rerun with "
                         "the same settings to resume, pass --overwrite to start over, or choose another --output")


def _n_dropped(summary: SynthSummary) -> int:
    return sum(summary.dropped.values())


def _write_summary(path: Path, summary: SynthSummary) -> None:
    write_text_atomic(path, json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n")


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="synth", unit="job", disable=None, leave=False)
