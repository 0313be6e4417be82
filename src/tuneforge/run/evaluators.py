"""What a run measures before and after training, as one declared list (:func:`evaluators_for`).

Each evaluator measures the untouched base before the first step (its numbers are the run's baseline, kept in
run.json at once so a resumed run still reports its gain) and the trained model after the last. The base is the
model with its adapter switched off; a full fine-tune is still the base before its first step, and a resumed one
has no untouched copy left, so it reports no "before" it did not measure.

* :class:`ExactMatch` — greedy answers on chat eval data (``--eval-generate``), spread over DDP ranks.
* :class:`GeneralPerplexity` — perplexity on general text (``--general-eval FILE|general``): forgetting.
* :class:`BenchmarkTasks` — lm-evaluation-harness tasks (``--general-eval tasks:NAME``): forgetting, per task.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Protocol

from ..config import RunConfig
from ..data.formats import Example, load_examples
from ..data.mixing import LoadedData, general_eval_file, general_eval_tasks
from ..inference.benchmarks import Benchmarks, flat_metrics, forgetting, primary_keys, table

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)

GENERAL_MAX_LENGTH = 128


class Evaluator(Protocol):
    def before(self, trainer: Trainer) -> None:
        """Measure the untouched base; keep the numbers with ``trainer.run_dir.keep_baseline``."""

    def after(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Measure the trained model; add the numbers (and the gain or forgetting) to ``metrics``."""


def evaluators_for(config: RunConfig, data: LoadedData) -> list[Evaluator]:
    """The run's evaluators, built before the model loads (a missing general-text file or an unknown lm-eval task
    fails here). The order is the order of the "after" measurements and of their log lines."""
    found: list[Evaluator] = [ExactMatch(data.eval)]
    path = general_eval_file(config.general_eval)
    if path:
        found.append(GeneralPerplexity(load_examples(path)))
    tasks = general_eval_tasks(config.general_eval)
    if tasks:
        found.append(BenchmarkTasks(Benchmarks(tasks, limit=config.general_eval_limit)))
    return found


def base_model(trainer: Trainer) -> contextlib.AbstractContextManager:
    """The untouched base: the adapter switched off (a full fine-tune is its own base until its first step)."""
    return contextlib.nullcontext() if trainer.method.trains_base_weights else trainer.handle.disabled()


def has_base(trainer: Trainer) -> bool:
    """A resumed full fine-tune has changed the only copy of the base: nothing to measure "before" on."""
    return not (trainer.method.trains_base_weights and trainer.config.resume)


class ExactMatch:
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def applies(self, config: RunConfig) -> bool:
        return bool(config.eval_generate and self.examples and all(e.kind == "chat" for e in self.examples))

    def before(self, trainer: Trainer) -> None:
        # A resumed run's baseline was measured by the run it continues (run.json); measured here only when it was not.
        if not self.applies(trainer.config) or "exact_match_before" in trainer.run_dir.kept_baseline():
            return
        with base_model(trainer):
            em = exact_match_over_ranks(trainer, self.examples)
        log.info("held-out exact match of the base model: %.1f%% (%d examples, %.1fs)", 100 * em["exact_match"],
                 em["n"], em["seconds"])
        trainer.run_dir.keep_baseline({"exact_match_before": em["exact_match"],
                                       "exact_match_before_seconds": em["seconds"]})

    def after(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not self.applies(trainer.config):
            return
        em = exact_match_over_ranks(trainer, self.examples)
        metrics.update(exact_match_after=em["exact_match"], exact_match_after_seconds=em["seconds"])
        trainer.run_dir.log({"step": trainer.total_steps,
                             **{k: v for k, v in metrics.items() if k.startswith("exact_match")}})


def exact_match_over_ranks(trainer: Trainer, examples: list[Example]) -> dict[str, Any]:
    """Exact match, each DDP rank generating a strided share of the records. A sharded model's forwards are
    collectives that must pair up across ranks, so there every rank generates every record (the same answers)."""
    from ..inference.evaluate import exact_match

    c, d = trainer.config, trainer.dist
    examples = examples[:c.eval_limit]
    if not d.enabled or d.shards:
        return exact_match(trainer.model, trainer.tokenizer, examples, max_new_tokens=c.eval_max_new_tokens)
    mine = [examples[i] for i in d.strided(len(examples))]
    em = (exact_match(trainer.model, trainer.tokenizer, mine, max_new_tokens=c.eval_max_new_tokens) if mine
          else {"exact_match": 0.0, "n": 0, "seconds": 0.0})
    shares = d.gather((em["exact_match"] * em["n"], em["n"], em["seconds"]))
    n = sum(share[1] for share in shares)
    return {"exact_match": sum(share[0] for share in shares) / n, "n": n,
            "seconds": max(share[2] for share in shares)}


class GeneralPerplexity:
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def measure(self, trainer: Trainer) -> dict[str, float]:
        from ..inference.evaluate import general_perplexity

        # The built-in passages are ~100 tokens: a short task's max_length (the demo's 64) should not cut them.
        max_length = max(trainer.config.max_length, GENERAL_MAX_LENGTH)
        config = trainer.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if positions:  # never past the positions the model has (GPT-2's learned table ends there)
            max_length = min(max_length, positions)
        return general_perplexity(trainer.model, trainer.tokenizer, self.examples, max_length)

    def before(self, trainer: Trainer) -> None:
        if not (self.examples and has_base(trainer)):
            return
        with base_model(trainer):
            before = self.measure(trainer)
        trainer.run_dir.keep_baseline({"general_loss_before": before["loss"],
                                       "general_ppl_before": before["perplexity"]})

    def after(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not self.examples:
            return
        after = self.measure(trainer)
        metrics.update(general_loss_after=after["loss"], general_ppl_after=after["perplexity"])
        if "general_loss_before" in metrics:  # > 0: general text got less likely; the log-ratio of perplexities
            metrics["forgetting"] = after["loss"] - metrics["general_loss_before"]
        # In the metrics, summary.json and the trackers' summary; not a metrics.jsonl line (one record per step).
        log.info("general-text perplexity (forgetting): %s%.3f", f"{metrics['general_ppl_before']:.3f} -> "
                 if "general_ppl_before" in metrics else "", after["perplexity"])


class BenchmarkTasks:
    def __init__(self, benchmarks: Benchmarks):
        self.benchmarks = benchmarks

    def before(self, trainer: Trainer) -> None:
        if not has_base(trainer):
            return
        with base_model(trainer):
            scores = self.benchmarks.evaluate(trainer.model, trainer.tokenizer)
        if scores:  # {}: not rank 0
            log.info("benchmarks of the base model:\n%s", table(scores))
            trainer.run_dir.keep_baseline(flat_metrics(scores, "before"))

    def after(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        scores = self.benchmarks.evaluate(trainer.model, trainer.tokenizer)
        if scores:  # benchmark_<task>_<metric>_after and forgetting_<task>, as general_* above
            log.info("benchmarks after training:\n%s", table(scores))
            keys = primary_keys(scores)
            metrics.update(flat_metrics(scores, "after"), benchmarks=keys)
            metrics.update(forgetting(metrics, keys))
