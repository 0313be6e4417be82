"""Compare hard prompts: run every template over the same labelled records and score the answers.

Generation is greedy, so a difference between two rows is the prompt's doing, not sampling noise.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from .fewshot import PromptBuilder
from .metrics import Metric, load_metric, score
from .template import Message, PromptTemplate, Record, TemplateError

# generate_fn(list of chat-message prompts, max_new_tokens=N) -> generated texts, one per prompt.
GenerateFn = Callable[..., list[str]]


@dataclass
class PromptEvalResult:
    """One template's row of the comparison."""

    template: str
    source: str | None
    metric: str
    score: float  # mean metric over the records
    n: int
    mean_output_length: float
    length_unit: str  # "tokens" when a tokenizer was given, else "chars"
    wall_seconds: float  # rendering + generation + scoring of this template
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        """The summary without per-record predictions (for tables and ``--json``)."""
        out = asdict(self)
        out.pop("predictions")
        return out


def evaluate_prompts(
    model: Any,
    tokenizer: Any,
    templates: Sequence[PromptTemplate],
    records: Sequence[Record],
    metric: str | Metric = "exact",
    *,
    answer_field: str = "output",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    generate_fn: GenerateFn | None = None,
    pool: Sequence[Record] | None = None,
) -> list[PromptEvalResult]:
    """Run each template over ``records`` and score the outputs against ``record[answer_field]``.

    ``generate_fn`` replaces the model (tests, remote backends); otherwise ``tuneforge.inference.generate.generate``
    runs ``model`` greedily. Few-shot templates that name no data file draw from ``pool`` (default: ``records``,
    leaving the query out). Every prompt is rendered before anything is generated, so a template that needs a
    field some record lacks fails at once, naming the template file and the field.
    """
    metric_name, metric_fn = load_metric(metric) if isinstance(metric, str) else (_name_of(metric), metric)
    generate_fn = generate_fn or _model_generate_fn(model, tokenizer, batch_size)
    for i, record in enumerate(records):
        if answer_field not in record:
            raise TemplateError(f"record {i}: no answer field {answer_field!r} (fields: {', '.join(sorted(record))})")
    return [
        _evaluate_one(t, records, pool if pool is not None else records, metric_name, metric_fn, answer_field,
                      max_new_tokens, generate_fn, tokenizer)
        for t in templates
    ]


def _evaluate_one(template, records, pool, metric_name, metric_fn, answer_field, max_new_tokens, generate_fn,
                  tokenizer) -> PromptEvalResult:
    start = time.perf_counter()
    builder = PromptBuilder(template, pool=pool, answer_field=answer_field)
    prompts: list[list[Message]] = [builder(r) for r in records]
    outputs = generate_fn(prompts, max_new_tokens=max_new_tokens)
    if len(outputs) != len(prompts):
        raise RuntimeError(f"generate_fn returned {len(outputs)} outputs for {len(prompts)} prompts")
    predictions = []
    for i, (record, output) in enumerate(zip(records, outputs)):
        answer = template.extract_answer(output)
        predictions.append({"index": i, "output": output, "answer": answer, "reference": record[answer_field],
                            "score": score(metric_fn, answer, record[answer_field])})
    lengths = [_length(p["output"], tokenizer) for p in predictions]
    n = len(predictions)
    return PromptEvalResult(
        template=template.label,
        source=template.source,
        metric=metric_name,
        score=sum(p["score"] for p in predictions) / n if n else 0.0,
        n=n,
        mean_output_length=sum(lengths) / n if n else 0.0,
        length_unit="tokens" if tokenizer is not None else "chars",
        wall_seconds=time.perf_counter() - start,
        predictions=predictions,
    )


def _length(text: str, tokenizer: Any) -> int:
    if tokenizer is None:
        return len(text)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _model_generate_fn(model: Any, tokenizer: Any, batch_size: int) -> GenerateFn:
    if model is None:
        raise ValueError("evaluate_prompts needs a model (and tokenizer) or a generate_fn")
    from tuneforge.inference.generate import generate

    def run(prompts: list[list[Message]], max_new_tokens: int) -> list[str]:
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=False,
                        batch_size=batch_size)

    return run


def _name_of(fn: Metric) -> str:
    return getattr(fn, "__name__", "metric")


def format_table(results: Sequence[PromptEvalResult]) -> str:
    """A fixed-width table, one row per template."""
    if not results:
        return "(no templates)"
    unit = results[0].length_unit
    header = ["template", results[0].metric, "n", f"mean_out_{unit}", "wall_s"]
    rows = [[r.template, f"{r.score:.3f}", str(r.n), f"{r.mean_output_length:.1f}", f"{r.wall_seconds:.1f}"]
            for r in results]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join(lines)
