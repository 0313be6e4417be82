"""The ``tuneforge`` command. Thin: parse, build a config, call the API. Logs go to stderr, results to stdout."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any


from ..errors import ConfigError, TuneforgeError
from ..flags import parse_overrides
from ..outputs import check_output, staged_file

# Only light modules above: torch, transformers, datasets and matplotlib are imported by the commands that use them,
# so `tuneforge --help` and a mistyped flag answer at once (bench/bench_startup.py; tests/test_cli.py checks it).
if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger("tuneforge")


# -- flag parsing: every RunConfig field is a flag, method/objective options route by prefix ----------------


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
        from ..run.trainer import DEMO_DIR

        config_path = str(DEMO_DIR / "demo.yaml")  # no config and no data: the bundled demonstration run
    return load_config(config_path, overrides)


# -- commands ------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, extra: list[str] = ()) -> int:
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
    from ..run.trainer import STREAMING_IN_ONE_PROCESS

    config_path = extra[0] if extra and not extra[0].startswith("-") else None
    if config_path and is_pipeline(config_path):  # each stage is its own run, checked as it starts
        return
    config = config_from_args(config_path, extra[1:] if config_path else extra)
    if config.streaming:  # refused under torchrun whatever the number of processes
        raise ConfigError(STREAMING_IN_ONE_PROCESS)
    Distributed(config.distributed_strategy, world_size=nproc).local_batch(config.batch_size,
                                                                          config.micro_batch_size)


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


def cmd_generate(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from ..data.bundled import held_out_name
    from ..data.formats import load_prompts
    from ..inference.generate import generate
    from ..inference.loading import default_model, load_for_inference

    model, tokenizer, _ = load_for_inference(default_model(args.adapter, args.model), args.adapter, args.device,
                                             inference_dtype(args))
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size)
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        print(generate(model, tokenizer, [messages], **options)[0])
        return 0
    if not (args.data and args.output):
        raise SystemExit("tuneforge generate: give --prompt TEXT, or --data IN.jsonl with --output OUT.jsonl")
    check_output(args.output, inputs=[args.data, args.adapter, args.model], overwrite=args.overwrite, kind="file")
    examples = load_prompts(held_out_name(args.data), args.data_format)
    predictions = generate(model, tokenizer, [ex.messages for ex in examples], progress_desc="generate", **options)
    with staged_file(args.output) as tmp, open(tmp, "w") as f:
        for ex, pred in zip(examples, predictions):
            f.write(json.dumps({**ex.fields, "prediction": pred}, ensure_ascii=False) + "\n")
    log.info("wrote %d predictions to %s", len(predictions), args.output)
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str] = ()) -> int:
    if (args.data is None) == (args.tasks is None):
        raise ConfigError("tuneforge eval: give --data FILE (exact match, perplexity, preference accuracy) or --tasks "
                          "NAME[,NAME] (lm-evaluation-harness benchmarks), not both")
    if args.tasks is not None:
        return eval_tasks(args)
    from ..data.bundled import held_out_name
    from ..data.formats import load_examples
    from ..inference.evaluate import evaluate
    from ..inference.loading import default_model, load_for_inference

    examples = load_examples(held_out_name(args.data), args.data_format)[:args.limit]
    if examples[0].kind == "preference":  # reward-model accuracy, or DPO's implicit-reward accuracy and margin
        from ..run.evaluate_preferences import evaluate_preferences

        result = evaluate_preferences(default_model(args.adapter, args.model), args.adapter, examples,
                                      device=args.device, beta=args.beta)
    else:
        model, tokenizer, _ = load_for_inference(default_model(args.adapter, args.model), args.adapter, args.device,
                                                 inference_dtype(args))
        result = evaluate(model, tokenizer, examples, max_new_tokens=args.max_new_tokens,
                          generate_answers=not args.no_generate)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def eval_tasks(args: argparse.Namespace) -> int:
    """``eval --tasks``: lm-eval tasks on the base + adapter in memory; the names are checked before the model loads."""
    from ..inference.benchmarks import Benchmarks, table
    from ..inference.loading import default_model, load_for_inference

    benchmarks = Benchmarks(args.tasks, limit=args.limit, batch_size=args.batch_size)
    model, tokenizer, _ = load_for_inference(default_model(args.adapter, args.model), args.adapter, args.device,
                                             inference_dtype(args))
    results = benchmarks.evaluate(model, tokenizer)
    print(json.dumps(results) if args.json else table(results))
    return 0


def inference_dtype(args: argparse.Namespace) -> str | None:
    """--dtype, else the precision the run trained in (on the same kind of device), said on stderr: the exact match
    `eval` reports is then the one training reported (a bf16 and a float32 base can differ by a few answers)."""
    from ..inference.loading import training_dtype

    if args.dtype or not args.adapter:
        return args.dtype
    dtype = training_dtype(args.adapter, args.device)
    if dtype is not None:
        log.info("computing in %s, the precision %s trained in (--dtype float32 to change)", dtype, args.adapter)
    return dtype


def cmd_merge(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from ..artifacts.merge import merge_adapter

    report = merge_adapter(args.adapter, args.output, model_name=args.model, device=args.device,
                           overwrite=args.overwrite, verify=not args.no_verify)
    verification = report.pop("verification", None)
    for key, value in report.items():
        print(f"{key}: {value}")
    if verification is not None:
        from ..artifacts.verify import format_summary

        print(format_summary(verification))
        return 0 if verification["passed"] else 1
    return 0


def cmd_verify(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from ..artifacts.verify import format_summary, verify

    summary = verify(args.run, args.against, model=args.model, device=args.device, n_prompts=args.prompts,
                     max_new_tokens=args.max_new_tokens, precision=args.precision, served_model=args.served_model,
                     api_key=args.api_key or os.environ.get("TUNEFORGE_API_KEY"), output=args.output)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0 if summary["passed"] else 1


def cmd_data_preview(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from ..data.preview import preview

    print(preview(args.data, model_name=args.model, index=args.index, data_format=args.data_format,
                  objective=args.objective, chat_template=args.chat_template, color=not args.no_color and
                  sys.stdout.isatty()))
    return 0


def cmd_methods(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from ..methods.report import methods_table

    print(methods_table(args.model, parse_overrides(list(extra))))
    return 0


# -- parser ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (no arguments: the bundled LoRA SFT demo)",
                           description=TRAIN_DESCRIPTION, formatter_class=TrainHelpFormatter,
                           usage="tuneforge train [CONFIG.yaml] [--key value ...]")
    # No argparse positional for CONFIG.yaml: argparse cannot know that a pass-through flag such as `--model`
    # takes a value, and would take that value (`train --model ./dir ...`) for the config file.
    train.set_defaults(func=cmd_train, passthrough=True)

    gen = sub.add_parser("generate", help="generate answers with a base model (+ adapter)")
    _inference_args(gen)
    gen.add_argument("--prompt", help="one prompt; the answer alone goes to stdout")
    gen.add_argument("--system", help="an optional system message for --prompt")
    gen.add_argument("--data", help="prompts: a .txt file (one per line), or JSONL/JSON/CSV/Parquet records with "
                     "instruction (output optional), question, prompt or messages; `demo`: the bundled held-out set")
    gen.add_argument("--output", help="JSONL: every input record plus 'prediction'")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.set_defaults(func=cmd_generate, max_new_tokens=128)

    ev = sub.add_parser("eval", help="perplexity and exact match (chat, text); reward or implicit-reward accuracy "
                        "and margins (preference pairs); lm-evaluation-harness benchmarks (--tasks)")
    _inference_args(ev)
    ev.add_argument("--data", help="held-out records (chat, text or preference pairs); `demo`: the bundled set")
    ev.add_argument("--tasks", metavar="NAME[,NAME]", help="lm-evaluation-harness tasks instead of --data: its names "
                    "(mmlu, arc_easy, hellaswag; data from the hub) or a local task YAML / folder of them; needs "
                    "pip install 'tuneforge[eval]'")
    ev.add_argument("--batch-size", type=int, default=8, help="--tasks: documents per forward (default 8)")
    ev.add_argument("--beta", type=float, help="preference pairs: the implicit reward's beta (default: the run's)")
    ev.add_argument("--limit", type=int, help="at most this many records (--tasks: documents per task)")
    ev.add_argument("--no-generate", action="store_true", help="perplexity only")
    ev.add_argument("--json", action="store_true", help="machine-readable output")
    ev.set_defaults(func=cmd_eval, max_new_tokens=32)

    merge = sub.add_parser("merge", help="fold a LoRA-family adapter into the base: a plain HF model directory")
    merge.add_argument("adapter", help="the run / adapter directory")
    merge.add_argument("--output", required=True)
    merge.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    merge.add_argument("--device")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    merge.add_argument("--no-verify", action="store_true", help="skip comparing the merged model with the adapter "
                       "(tuneforge verify; summary in OUTPUT/verify.json); a failed check exits 1")
    merge.set_defaults(func=cmd_merge)

    ver = sub.add_parser("verify", help="compare an exported artefact with the run it came from: greedy agreement, "
                         "KL, max logit difference, tokenizer; exit 1 when below the precision's threshold",
                         description="The reference is the run's base + adapter in float32, on the run's eval "
                         "prompts (else a built-in set). ARTEFACT: merged (merged in memory), merged:DIR, gguf:FILE "
                         "(llama.cpp when llama-cpp-python is installed: pip install 'tuneforge[gguf]'), vllm:DIR, "
                         "serve:URL. The summary goes to verify.json beside the artefact (or --output).")
    ver.add_argument("run", help="the run / adapter directory")
    ver.add_argument("--against", required=True, metavar="ARTEFACT")
    ver.add_argument("--model", help="base model (default: the one the run was trained on)")
    ver.add_argument("--device")
    ver.add_argument("--prompts", type=int, default=16, help="held-out prompts to compare on (default 16)")
    ver.add_argument("--max-new-tokens", type=int, default=32, help="reference answer length (default 32)")
    ver.add_argument("--precision", help="threshold to apply (f32, f16, bf16, q8_0, q4_k...); default: the "
                     "artefact's own (a server: f32)")
    ver.add_argument("--served-model", help="serve:URL: the request's `model` (default: the run folder's name)")
    ver.add_argument("--api-key", help="serve:URL: bearer token (default: $TUNEFORGE_API_KEY)")
    ver.add_argument("--output", help="where to write the JSON summary (default: beside the artefact)")
    ver.add_argument("--json", action="store_true", help="print the summary as JSON")
    ver.set_defaults(func=cmd_verify)

    data = sub.add_parser("data", help="inspect data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prev = data_sub.add_parser("preview", help="show one rendered example with its supervised tokens marked")
    prev.add_argument("data")
    prev.add_argument("--model", default=None, help="whose tokenizer / chat template (default: embedded)")
    prev.add_argument("--index", type=int, default=0)
    prev.add_argument("--data-format", default="auto")
    prev.add_argument("--objective", default=None, help="sft or pretrain (default: from the data)")
    prev.add_argument("--chat-template", default=None)
    prev.add_argument("--no-color", action="store_true")
    prev.set_defaults(func=cmd_data_preview)

    methods = sub.add_parser("methods", help="list every method with its trainable parameters on a model; "
                             "method options as flags (--lora-r 16)")
    methods.add_argument("--model", default=None)
    methods.set_defaults(func=cmd_methods, passthrough=True)

    for extension in _extensions():
        extension(sub)
    return parser


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


def _extensions():
    """Subcommands that live beside their feature (prompting, alignment)."""
    found = []
    for module, attr in (("tuneforge.commands.prompting", "add_subcommands"),
                         ("tuneforge.commands.alignment", "add_subcommands"),
                         ("tuneforge.commands.serve", "add_subcommands"),
                         ("tuneforge.commands.convert", "add_subcommands"),
                         ("tuneforge.run.report", "add_subcommands"),
                         ("tuneforge.choose.compare", "add_subcommands"), ("tuneforge.choose.recommend",
                         "add_subcommands"), ("tuneforge.commands.sweep", "add_subcommands")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        found.append(getattr(mod, attr))
    return found


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model (default: the adapter's base, else the embedded model)")
    p.add_argument("--adapter", help="an adapter / run directory to apply")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--data-format", default="auto")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the base's precision (default: the one the run trained in, on this kind of device)")


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return (args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)) or 0
    except (TuneforgeError, OSError, ValueError, KeyError) as e:  # the user's to fix; anything else is a bug
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() is its repr
        print(f"tuneforge: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
