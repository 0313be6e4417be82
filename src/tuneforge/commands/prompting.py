"""``tuneforge prompt eval|render`` and ``tuneforge synth``: thin wrappers that parse flags and call the library.

The main CLI registers these with ``add_subcommands(subparsers)``; each subcommand sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..outputs import OutputConflict, check_not_input
from ..prompting.evaluate import evaluate_prompts, format_table
from ..prompting.metrics import load_metric
from ..prompting.template import TemplateError, builtin_template_names, load_template

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prompt`` (``eval``, ``render``) and ``synth`` on an existing argparse subparsers object."""
    prompt = subparsers.add_parser("prompt", help="hard prompts: compare templates on labelled data")
    prompt_sub = prompt.add_subparsers(dest="prompt_command", metavar="{eval,render}")
    prompt_sub.required = True
    _add_prompt_eval(prompt_sub)
    _add_prompt_render(prompt_sub)
    _add_synth(subparsers)


# -- prompt eval / render ---------------------------------------------------------------------------


def _add_prompt_eval(sub) -> None:
    p = sub.add_parser("eval", help="run every template over labelled data and compare a metric",
                       description="Run each prompt template over the same labelled records with one model "
                       "(greedy decoding) and print one row per template: metric, mean output length in "
                       "tokens, wall time. Built-in templates: " + ", ".join(builtin_template_names()))
    p.add_argument("--model", help="embedded name, HF directory, .gguf or hub id (default: the --adapter's base "
                   f"model, else {DEFAULT_MODEL})")
    p.add_argument("--adapter", help="a saved adapter directory to attach (tuneforge or PEFT format)")
    p.add_argument("--data", required=True, help="labelled records (.jsonl/.json/.csv/.parquet)")
    p.add_argument("--templates", nargs="+", required=True, metavar="YAML",
                   help="template files, or built-in names (zero_shot role_expert few_shot cot)")
    p.add_argument("--metric", default="exact",
                   help="exact | contains | regex:PATTERN | module:function | file.py:function (default exact: "
                   "case, spacing, and punctuation at the ends are ignored)")
    p.add_argument("--answer-field", default="output", help="the record field holding the reference answer")
    p.add_argument("--fewshot-data", help="example pool for few-shot templates that name none "
                   "(default: the --data records, leaving each query out)")
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--predictions", help="write every template's per-record outputs and scores to this JSONL")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=run_prompt_eval)


def _add_prompt_render(sub) -> None:
    p = sub.add_parser("render", help="show the chat messages a template makes for a record")
    p.add_argument("--template", required=True, help="template file or built-in name")
    p.add_argument("--data", required=True, help="records (.jsonl/.json/.csv/.parquet)")
    p.add_argument("--index", type=int, default=0, help="which record (0-based)")
    p.add_argument("--answer-field", default="output")
    p.add_argument("--fewshot-data", help="example pool when the template names none (default: --data)")
    p.set_defaults(func=run_prompt_render)


def run_prompt_eval(args: argparse.Namespace) -> int:
    """``tuneforge prompt eval``: returns 0, or 2 on bad input (the message says which file and field)."""
    _setup_logging()
    try:
        templates = [load_template(t) for t in args.templates]
        records = _read_records(args.data, args.limit)
        pool = _read_records(args.fewshot_data, None) if args.fewshot_data else None
        load_metric(args.metric)  # a typo in --metric should fail before the model loads
    except (TemplateError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tuneforge.inference.loading import default_model

    args.model = default_model(args.adapter, args.model)
    model, tokenizer = load_model_for_cli(args.model, args.adapter, args.device)
    try:
        results = evaluate_prompts(model, tokenizer, templates, records, args.metric,
                                   answer_field=args.answer_field, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, pool=pool)
    except (TemplateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.predictions:
        _write_predictions(Path(args.predictions), results)
    if args.json:
        print(json.dumps([r.row() for r in results], indent=2))
    else:
        print(f"model {args.model}{' + ' + args.adapter if args.adapter else ''}, {len(records)} records "
              f"from {args.data}, greedy, max {args.max_new_tokens} new tokens")
        print(format_table(results))
    return 0


def run_prompt_render(args: argparse.Namespace) -> int:
    from ..prompting.fewshot import PromptBuilder

    try:
        template = load_template(args.template)
        records = _read_records(args.data, None)
        if not 0 <= args.index < len(records):
            raise ValueError(f"{args.data}: --index {args.index} is out of range (0..{len(records) - 1})")
        pool = _read_records(args.fewshot_data, None) if args.fewshot_data else records
        messages = PromptBuilder(template, pool, args.answer_field)(records[args.index])
    except (TemplateError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for message in messages:
        print(f"[{message['role']}]\n{message['content']}\n")
    return 0


def load_model_for_cli(name: str | None, adapter: str | None, device: str | None) -> tuple[Any, Any]:
    """Base model plus an optional adapter, through ``tuneforge.inference.loading`` (so a QLoRA adapter gets its 4-bit
    base);
    the one place these commands touch model weights. ``name`` None: the adapter's base, else the default."""
    from tuneforge.inference.loading import default_model, load_for_inference

    model, tokenizer, _ = load_for_inference(default_model(adapter, name), adapter, device)
    return model, tokenizer


def _read_records(path: str, limit: int | None) -> list[dict[str, Any]]:
    from tuneforge.data.formats import read_rows

    records = []
    for _, row in read_rows(path):
        records.append(row)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _write_predictions(path: Path, results) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for result in results:
            for p in result.predictions:
                f.write(json.dumps({"template": result.template, **p}, ensure_ascii=False) + "\n")


# -- synth --------------------------------------------------------------------------------------------


def _add_synth(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="write training data with a teacher model (HTTP or local)",
        description="Generate SFT records (instruction/input/output) or preference pairs (prompt/chosen/"
        "rejected) with a teacher: an OpenAI-compatible server (--teacher-url) or a local model. Interrupted "
        "runs resume: rerun the same command. Kept records carry provenance under 'meta'; a summary is written "
        "beside the output as NAME.summary.json, dropped replies to NAME.jobs.jsonl.")
    what = p.add_argument_group("what to write about (one of)")
    source = what.add_mutually_exclusive_group(required=True)
    source.add_argument("--topics", help="text file, one topic per line ('#' comments)")
    source.add_argument("--documents", help="directory of .txt/.md files; questions are grounded in each chunk")
    what.add_argument("--count", type=int, help="jobs to run, round-robin over topics/chunks (default: one each); "
                      "records kept <= count after filtering")
    what.add_argument("--chunk-chars", type=int, default=2000, help="maximum characters per document chunk")
    what.add_argument("--include-context", action="store_true",
                      help="documents: put the chunk into each record's input (default: closed-book questions)")

    out = p.add_argument_group("output")
    out.add_argument("--output", required=True, help="JSONL file; appended to and resumed from")
    out.add_argument("--format", choices=["sft", "preference"], default="sft")
    out.add_argument("--template", help="teacher prompt template (default: built-in synth_topic / synth_document)")
    out.add_argument("--judge-template", help="judge prompt template (default: built-in synth_judge)")
    out.add_argument("--max-jobs", type=int, help="stop after this many jobs in this run (rerun to continue)")
    out.add_argument("--overwrite", action="store_true", help="start over: replace --output (and its .jobs.jsonl "
                     "and .summary.json) instead of resuming it; needed when the settings changed")

    teacher = p.add_argument_group("teacher")
    teacher.add_argument("--teacher-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1; "
                         "without it a local model writes the data")
    teacher.add_argument("--teacher-model", help=f"model name on the server; local: a tuneforge model name "
                         f"(default: the --adapter's base model, else {DEFAULT_MODEL})")
    teacher.add_argument("--api-key-env", help="environment variable holding the API key (default: "
                         "OPENAI_API_KEY if set); the key itself is never printed")
    teacher.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight at once")
    teacher.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    teacher.add_argument("--max-retries", type=int, default=5, help="retries per request before it counts failed")
    teacher.add_argument("--temperature", type=float, default=0.8)
    teacher.add_argument("--max-tokens", type=int, default=768, help="maximum tokens per teacher reply")
    teacher.add_argument("--adapter", help="local teacher: an adapter directory to attach")
    teacher.add_argument("--batch-size", type=int, default=8, help="local teacher: generation batch size")
    teacher.add_argument("--device", help="local teacher: cpu, cuda ...")
    teacher.add_argument("--seed", type=int, default=0, help="local teacher sampling seed; HTTP backoff jitter")

    filters = p.add_argument_group("filters (applied before anything is written)")
    filters.add_argument("--min-answer-chars", type=int, default=2)
    filters.add_argument("--max-answer-chars", type=int, default=4000)
    filters.add_argument("--max-question-chars", type=int, default=1000)
    filters.add_argument("--answer-format", choices=["text", "json"], default="text",
                         help="json: the answer must parse as JSON")
    filters.add_argument("--answer-regex", help="the answer must match this regular expression entirely")
    filters.add_argument("--near-dup-threshold", type=float, default=0.85,
                         help="drop a question whose character 5-gram Jaccard similarity to a kept one is >= this")
    filters.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    filters.add_argument("--judge-threshold", type=float,
                         help="ask the teacher to grade each record 1-10 and keep those scoring >= this")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    """``tuneforge synth``: 0 when every planned job is done, 1 when some failed (rerun to retry), 2 on bad
    input or a teacher that rejects every request."""
    from ..prompting.sources import read_documents, read_topics
    from ..prompting.synth import synthesize
    from ..prompting.teacher import TeacherConfigError

    _setup_logging()
    try:
        check_not_input(args.output, [args.topics, args.documents, args.template, args.judge_template])
        sources = read_topics(args.topics) if args.topics else read_documents(args.documents, args.chunk_chars)
        config = _synth_config(args)
        teacher = make_teacher(args)
    except (TemplateError, ValueError, FileNotFoundError, OutputConflict) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = synthesize(sources, teacher, config)
    except (TeacherConfigError, ValueError) as e:  # a rejected key / unknown model; a corrupt output file
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teacher.close()
    print(summary.describe())
    print(f"summary: {config.summary_path}")
    return 1 if summary.failed else 0


def _synth_config(args: argparse.Namespace):
    from ..prompting.synth import SynthConfig

    if args.count is not None and args.count < 0:
        raise ValueError("--count must be >= 0")
    if args.answer_regex:
        try:
            re.compile(args.answer_regex)
        except re.error as e:
            raise ValueError(f"--answer-regex is not a valid regular expression: {e}") from None
    return SynthConfig(
        output=Path(args.output), count=args.count, format=args.format,
        template=load_template(args.template) if args.template else None,
        judge_template=load_template(args.judge_template) if args.judge_template else None,
        temperature=args.temperature, max_tokens=args.max_tokens, include_context=args.include_context,
        min_answer_chars=args.min_answer_chars, max_answer_chars=args.max_answer_chars,
        max_question_chars=args.max_question_chars, answer_format=args.answer_format,
        answer_regex=args.answer_regex, dedup=not args.no_dedup, near_dup_threshold=args.near_dup_threshold,
        judge_threshold=args.judge_threshold, max_jobs=args.max_jobs, overwrite=args.overwrite,
    )


def make_teacher(args: argparse.Namespace):
    """An HTTP teacher when ``--teacher-url`` is given, else a local model loaded through tuneforge."""
    from ..prompting.teacher import LocalTeacher, TeacherClient

    if args.teacher_url:
        if not args.teacher_model:
            raise ValueError("--teacher-url needs --teacher-model (the model name the server serves)")
        return TeacherClient(args.teacher_url, args.teacher_model, api_key=_api_key(args.api_key_env),
                             timeout=args.timeout, max_retries=args.max_retries, concurrency=args.concurrency,
                             seed=args.seed)
    from tuneforge.inference.loading import default_model

    name = default_model(args.adapter, args.teacher_model)
    model, tokenizer = load_model_for_cli(name, args.adapter, args.device)
    return LocalTeacher(model, tokenizer, name=name, batch_size=args.batch_size, seed=args.seed)


def _api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return os.environ.get("OPENAI_API_KEY") or None
    key = os.environ.get(env_name)
    if not key:
        raise ValueError(f"--api-key-env {env_name}: that environment variable is not set")
    return key


def _setup_logging() -> None:
    # Crash repair warns through logging; make sure a bare CLI run shows it.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
