"""``tuneforge train [CONFIG.yaml] [--key value ...]``: one run, a pipeline of runs (``stages:``), or torchrun's
processes (``--nproc-per-node N``); prints what the run measured."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..flags import parse_overrides

if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger("tuneforge")


def add_subcommands(sub) -> None:
    train = sub.add_parser("train", help="train a model (no arguments: the bundled LoRA SFT demo)",
                           description=TRAIN_DESCRIPTION, formatter_class=TrainHelpFormatter,
                           usage="tuneforge train [CONFIG.yaml] [--key value ...]")
    # No argparse positional for CONFIG.yaml: argparse cannot know that a pass-through flag such as `--model`
    # takes a value, and would take that value (`train --model ./dir ...`) for the config file.
    train.set_defaults(func=cmd_train, passthrough=True)


def pop_nproc_per_node(tokens: list[str]) -> tuple[int | None, list[str]]:
    """``--nproc-per-node N`` (a launcher flag, not a config key) and the remaining tokens."""
    for i, token in enumerate(tokens):
        key, eq, value = token.partition("=")
        if key in ("--nproc-per-node", "--nproc_per_node"):
            if not eq:
                value = tokens[i + 1] if i + 1 < len(tokens) else ""
            if not value.isdigit() or int(value) < 1:  # bad input: the one-line error and exit 2 (main)
                raise ConfigError(f"--nproc-per-node needs a positive number of processes, got {value!r}")
            return int(value), tokens[:i] + tokens[i + (1 if eq else 2):]
    return None, tokens


def config_from_args(config_path: str | None, extra: list[str]) -> RunConfig:
    from ..config import load_config

    overrides = parse_overrides(extra)
    if config_path is None and overrides.get("data") is None:
        from ..run.training_data import DEMO_DIR

        config_path = str(DEMO_DIR / "demo.yaml")  # no config and no data: the bundled demonstration run
    return load_config(config_path, overrides)


# -- commands ------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from ..run.distributed import is_main_process
    from ..run.trainer import train

    # The YAML file is the first pass-through argument (see build_parser for why it is not a positional).
    extra = list(extra)
    nproc, extra = pop_nproc_per_node(extra)
    if nproc is not None:
        from ..run.distributed import launch_torchrun

        check_before_launch(nproc, extra)
        return launch_torchrun(nproc, ["train", *extra])  # this same command, one process per device
    config_path = extra.pop(0) if extra and not extra[0].startswith("-") else None
    from ..run.pipeline import is_pipeline

    if config_path and is_pipeline(config_path):  # `stages:`: several runs, each feeding the next
        from ..run.pipeline import run_pipeline

        state = run_pipeline(config_path, parse_overrides(extra))
        print("\n".join(f"stage {name}: {path}" for name, path in state["done"].items()))
        print(f"final model: {state['model']}")
        return 0
    from ..run.multi_adapter import is_side_by_side

    if config_path and is_side_by_side(config_path):  # `adapters:`: several LoRA adapters on one base, one process
        return cmd_train_side_by_side(config_path, extra)
    config = config_from_args(config_path, extra)
    log.info("model=%s method=%s objective=%s output=%s", config.model, config.method, config.objective,
             config.output)
    result = train(config)
    if not is_main_process():  # one report per run, not one per torchrun process
        return 0
    m = result.metrics
    print(f"trained {result.steps} steps -> {result.output}")
    print(f"trainable parameters: {m['trainable_params']:,} of {m['total_params']:,} "
          f"({100 * m['trainable_params'] / m['total_params']:.3f}%)")
    if "loss" in m:
        print(f"final train loss: {m['loss']:.4f}" + (f", eval loss: {m['eval_loss']:.4f}" if "eval_loss" in m else ""))
    before = {k[len("eval_before_"):]: v for k, v in m.items() if k.startswith("eval_before_")}
    changes = [f"{name} {value:.4g} -> {m['eval_' + name]:.4g}" for name, value in before.items()
               if f"eval_{name}" in m]
    if changes:
        print("held-out eval, before -> after: " + ", ".join(changes))
    if "exact_match_after" in m:
        before = m.get("exact_match_before")
        line = f"held-out exact match: after {m['exact_match_after']:.1%}"
        if before is not None:
            line = f"held-out exact match: before {before:.1%} -> after {m['exact_match_after']:.1%}"
        print(line)
    if "general_ppl_after" in m:  # forgetting: general text the base model knew, before -> after
        before = f"{m['general_ppl_before']:.3f} -> " if "general_ppl_before" in m else ""
        print(f"general-text perplexity (forgetting): {before}{m['general_ppl_after']:.3f}")
    for line in benchmark_lines(m):
        print(line)
    for source in m.get("data_sources", []):
        print(describe_source(source))
    for key, value in (result.handle.summary() if result.handle else {}).items():
        print(f"{key}: {summarise(value)}")
    from ..run.report import write_report

    print(f"report: {write_report([result.output])}")  # charts of metrics.jsonl and an HTML page (tuneforge report)
    return 0


def cmd_train_side_by_side(config_path: str, extra: list[str]) -> int:
    """``tuneforge train CONFIG.yaml`` whose file lists ``adapters:`` (docs/sweep.md): one line per adapter."""
    from ..run import multi_adapter

    lanes = multi_adapter.load_lanes(config_path, parse_overrides(extra))
    results = multi_adapter.train_side_by_side(lanes)
    print("\n".join(multi_adapter.describe(results, lanes)))
    return 0


def benchmark_lines(m: dict[str, Any]) -> list[str]:
    """``--general-eval tasks:...``: each task's primary metric before -> after, and the forgetting."""
    lines = []
    for task, keys in m.get("benchmarks", {}).items():
        if keys["after"] not in m:
            continue
        before = f"{m[keys['before']]:.4f} -> " if keys["before"] in m else ""
        lost = m.get(keys["forgetting"])
        lines.append(f"benchmark {task} {keys['metric']} (n={keys['n']}): {before}{m[keys['after']]:.4f}"
                     + (f" (forgetting {lost:+.4f})" if lost is not None else ""))
    return lines


def describe_source(source: dict[str, Any]) -> str:
    """One data source of a mix: examples drawn from its records (in memory), or records read (streaming, where
    the source's length is never known)."""
    if "records_read" in source:
        return f"data source {source['source']}: {source['records_read']} records read ({source['share']:.1%})"
    return (f"data source {source['source']}: {source['examples']} examples ({source['share']:.1%}) from "
            f"{source['records']} records")


def check_before_launch(nproc: int, extra: list[str]) -> None:
    """Build the run's config here, once, before torchrun starts workers: bad input is then one error line, not
    one per rank under torchrun's traceback. The per-rank batch split is checked as the workers would."""
    from ..run.distributed import Distributed
    from ..run.pipeline import is_pipeline
    from ..run.training_data import STREAMING_IN_ONE_PROCESS

    config_path = extra[0] if extra and not extra[0].startswith("-") else None
    if config_path and is_pipeline(config_path):  # each stage is its own run, checked as it starts
        return
    config = config_from_args(config_path, extra[1:] if config_path else extra)
    if config.streaming:  # refused under torchrun whatever the number of processes
        raise ConfigError(STREAMING_IN_ONE_PROCESS)
    from ..run.context_parallel import check_before_launch as check_context_parallel

    check_context_parallel(config, nproc)  # heads, world size, model family: one line before any worker starts
    ranks = Distributed(config.distributed_strategy, world_size=nproc)
    ranks.context_parallel = config.context_parallel
    ranks.local_batch(config.batch_size, config.micro_batch_size)


def summarise(value: Any) -> str:
    """One line for a summary value; per-module tables (AdaLoRA's ranks) become totals, the file has the rest."""
    from ..methods.adapter_files import TUNEFORGE_ADAPTER_META

    if isinstance(value, dict) and len(value) > 8:
        numbers = [v for v in value.values() if isinstance(v, (int, float))]
        if len(numbers) == len(value):
            return (f"{len(value)} modules, total {sum(numbers)}, min {min(numbers)}, max {max(numbers)} "
                    f"(per module: {TUNEFORGE_ADAPTER_META})")
        return f"{len(value)} entries (see {TUNEFORGE_ADAPTER_META})"
    return value if isinstance(value, str) else json.dumps(value)


TRAIN_DESCRIPTION = ("Any config key is also a flag (--learning-rate 1e-4); method options by prefix (--lora-r 16, "
                     "--prefix-num-virtual-tokens 20); objective options too (--dpo-beta 0.1). Flags override the "
                     "YAML file.")


class TrainHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``train --help`` ends with every config key and every method's and objective's options. Listing them imports
    the registries (and torch), so it is done when that help is printed, not whenever the parser is built."""

    def add_text(self, text: str | None) -> None:
        if text == TRAIN_DESCRIPTION:
            text += "\n\nConfig keys:\n" + _config_help()
        super().add_text(text)


def _config_help() -> str:
    """Every run key, then every method's and objective's options under their declared flag prefix."""
    from ..config import RunConfig
    from ..methods.base import METHODS
    from ..objectives.base import OBJECTIVES

    from ..data.formats import FORMATS

    # The choices come from the registries, so a new method, objective or data format is listed without an edit here.
    choices = {"method": METHODS.names(), "objective": OBJECTIVES.names(), "data_format": ["auto", *FORMATS]}
    lines = [f"  --{name.replace('_', '-'):<32} {f.description}"
             + (f" One of: {', '.join(choices[name])}." if name in choices else "")
             for name, f in RunConfig.model_fields.items()]
    for title, registry in (("Method options", METHODS), ("Objective options", OBJECTIVES)):
        for prefix, cls in reversed(registry.flag_prefixes().items()):
            section = "method_options" if registry is METHODS else "objective_options"
            lines.append(f"\n{title}: {cls.name} (--{prefix.replace('_', '-')}-OPTION; in YAML under {section})")
            for option, (default, text) in cls.config_class.describe().items():
                if option in RunConfig.model_fields:  # run-level keys the trainer passes on (seed, max_length_policy)
                    continue
                flag = option if option.startswith(prefix + "_") else f"{prefix}_{option}"
                lines.append(f"  --{flag.replace('_', '-'):<32} {text} [default: {default}]")
    return "\n".join(lines)
