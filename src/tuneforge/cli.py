"""The ``tuneforge`` command. Thin: parse, build a config, call the API. Logs go to stderr, results to stdout."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import yaml

from .config import RunConfig, load_config
from .errors import TuneforgeError
from .inference import default_model, load_for_inference
from .methods.adapter_files import TUNEFORGE_ADAPTER_META
from .outputs import check_output, staged_file
from .distributed import is_main_process

log = logging.getLogger("tuneforge")


# -- flag parsing: every RunConfig field is a flag, method/objective options route by prefix ----------------


def parse_value(text: str) -> Any:
    """``16`` → 16, ``1e-4`` → 0.0001, ``true`` → True, ``null`` → None, ``q_proj,v_proj`` or ``[a, b]`` → list.

    Anything else stays the string it is: free text such as a prompt-tuning init text ("Sentiment: yes, no")
    must reach the config unchanged, so only the unambiguous forms above are converted.
    """
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.startswith(("[", "{")):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, (list, dict)) else text
    if "," in text and not any(c.isspace() for c in text):
        return [parse_value(part) for part in text.split(",") if part]
    return text


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / bare ``--flag`` (true) pairs, in order."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise SystemExit(f"tuneforge: unexpected argument {token!r} (options look like --key value)")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, i = tokens[i + 1], i + 1
            else:
                value = "true"
        key = key.replace("-", "_")
        if key == "data" and key in out:  # --data a.jsonl:0.8 --data b.jsonl:0.2: a mix of sources
            out[key] = [*(out[key] if isinstance(out[key], list) else [out[key]]), parse_value(value)]
        else:
            out[key] = parse_value(value)
        i += 1
    return out


def pop_nproc_per_node(tokens: list[str]) -> tuple[int | None, list[str]]:
    """``--nproc-per-node N`` (a launcher flag, not a config key) and the remaining tokens."""
    for i, token in enumerate(tokens):
        key, eq, value = token.partition("=")
        if key in ("--nproc-per-node", "--nproc_per_node"):
            if not eq:
                value = tokens[i + 1] if i + 1 < len(tokens) else ""
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"tuneforge: --nproc-per-node needs a positive number of processes, got {value!r}")
            return int(value), tokens[:i] + tokens[i + (1 if eq else 2):]
    return None, tokens


def config_from_args(config_path: str | None, extra: list[str]) -> RunConfig:
    overrides = parse_overrides(extra)
    if config_path is None and overrides.get("data") is None:
        from .trainer import DEMO_DIR

        config_path = str(DEMO_DIR / "demo.yaml")  # no config and no data: the bundled demonstration run
    return load_config(config_path, overrides)


# -- commands ------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from .trainer import train

    # The YAML file is the first pass-through argument (see build_parser for why it is not a positional).
    extra = list(extra)
    nproc, extra = pop_nproc_per_node(extra)
    if nproc is not None:
        from .distributed import launch_torchrun

        return launch_torchrun(nproc, ["train", *extra])  # this same command, one process per device
    config_path = extra.pop(0) if extra and not extra[0].startswith("-") else None
    from .pipeline import is_pipeline

    if config_path and is_pipeline(config_path):  # `stages:`: several runs, each feeding the next
        from .pipeline import run_pipeline

        state = run_pipeline(config_path, parse_overrides(extra))
        print("\n".join(f"stage {name}: {path}" for name, path in state["done"].items()))
        print(f"final model: {state['model']}")
        return 0
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
    for source in m.get("data_sources", []):
        print(f"data source {source['source']}: {source['examples']} examples ({source['share']:.1%}) from "
              f"{source['records']} records")
    for key, value in (result.handle.summary() if result.handle else {}).items():
        print(f"{key}: {summarise(value)}")
    from .report import write_report

    print(f"report: {write_report([result.output])}")  # charts of metrics.jsonl and an HTML page (tuneforge report)
    return 0


def summarise(value: Any) -> str:
    """One line for a summary value; per-module tables (AdaLoRA's ranks) become totals, the file has the rest."""
    if isinstance(value, dict) and len(value) > 8:
        numbers = [v for v in value.values() if isinstance(v, (int, float))]
        if len(numbers) == len(value):
            return (f"{len(value)} modules, total {sum(numbers)}, min {min(numbers)}, max {max(numbers)} "
                    f"(per module: {TUNEFORGE_ADAPTER_META})")
        return f"{len(value)} entries (see {TUNEFORGE_ADAPTER_META})"
    return value if isinstance(value, str) else json.dumps(value)


def cmd_generate(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from .data.formats import load_examples
    from .evaluate import split_prompt_answer
    from .generate import generate

    model, tokenizer, _ = load_for_inference(default_model(args.adapter, args.model), args.adapter, args.device)
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
    examples = load_examples(args.data, args.data_format)
    prompts = []
    for ex in examples:
        if ex.kind == "chat":
            prompts.append(split_prompt_answer(ex)[0] if ex.messages[-1]["role"] == "assistant" else ex.messages)
        elif ex.kind in ("prompt", "preference"):
            prompts.append(ex.messages)
        else:
            raise SystemExit(f"{ex.source}: a {ex.kind!r} record has no prompt to answer")
    predictions = generate(model, tokenizer, prompts, **options)
    with staged_file(args.output) as tmp, open(tmp, "w") as f:
        for ex, pred in zip(examples, predictions):
            f.write(json.dumps({**ex.fields, "prediction": pred}, ensure_ascii=False) + "\n")
    log.info("wrote %d predictions to %s", len(predictions), args.output)
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from .data.formats import load_examples
    from .evaluate import evaluate

    examples = load_examples(args.data, args.data_format)[:args.limit]
    if examples[0].kind == "preference":  # reward-model accuracy, or DPO's implicit-reward accuracy and margin
        from .evaluate_preferences import evaluate_preferences

        result = evaluate_preferences(default_model(args.adapter, args.model), args.adapter, examples,
                                      device=args.device, beta=args.beta)
    else:
        model, tokenizer, _ = load_for_inference(default_model(args.adapter, args.model), args.adapter, args.device)
        result = evaluate(model, tokenizer, examples, max_new_tokens=args.max_new_tokens,
                          generate_answers=not args.no_generate)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_merge(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from .merge import merge_adapter

    report = merge_adapter(args.adapter, args.output, model_name=args.model, device=args.device,
                           overwrite=args.overwrite, verify=not args.no_verify)
    verification = report.pop("verification", None)
    for key, value in report.items():
        print(f"{key}: {value}")
    if verification is not None:
        from .verify import format_summary

        print(format_summary(verification))
        return 0 if verification["passed"] else 1
    return 0


def cmd_verify(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from .verify import format_summary, verify

    summary = verify(args.run, args.against, model=args.model, device=args.device, n_prompts=args.prompts,
                     max_new_tokens=args.max_new_tokens, precision=args.precision, served_model=args.served_model,
                     api_key=args.api_key or os.environ.get("TUNEFORGE_API_KEY"), output=args.output)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0 if summary["passed"] else 1


def cmd_data_preview(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from .data.preview import preview

    print(preview(args.data, model_name=args.model, index=args.index, data_format=args.data_format,
                  objective=args.objective, chat_template=args.chat_template, color=not args.no_color and
                  sys.stdout.isatty()))
    return 0


def cmd_methods(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from .methods.report import methods_table

    print(methods_table(args.model, parse_overrides(list(extra))))
    return 0


# -- parser ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (no arguments: the bundled LoRA SFT demo)",
                           description="Any config key is also a flag (--learning-rate 1e-4); method options "
                           "by prefix (--lora-r 16, --prefix-num-virtual-tokens 20); objective options too "
                           "(--dpo-beta 0.1). Flags override the YAML file.\n\nConfig keys:\n" + _config_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           usage="tuneforge train [CONFIG.yaml] [--key value ...]")
    # No argparse positional for CONFIG.yaml: argparse cannot know that a pass-through flag such as `--model`
    # takes a value, and would take that value (`train --model ./dir ...`) for the config file.
    train.set_defaults(func=cmd_train, passthrough=True)

    gen = sub.add_parser("generate", help="generate answers with a base model (+ adapter)")
    _inference_args(gen)
    gen.add_argument("--prompt", help="one prompt; the answer alone goes to stdout")
    gen.add_argument("--system", help="an optional system message for --prompt")
    gen.add_argument("--data", help="JSONL/JSON/CSV/Parquet of prompts (chat, alpaca or prompt records)")
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
                        "and margins (preference pairs)")
    _inference_args(ev)
    ev.add_argument("--data", required=True)
    ev.add_argument("--beta", type=float, help="preference pairs: the implicit reward's beta (default: the run's)")
    ev.add_argument("--limit", type=int)
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


def _extensions():
    """Subcommands that live beside their feature (prompting, alignment)."""
    found = []
    for module, attr in (("tuneforge.prompting.cli", "add_subcommands"),
                         ("tuneforge.objectives.cli_alignment", "add_subcommands"),
                         ("tuneforge.serve.cli", "add_subcommands"),
                         ("tuneforge.convert_cli", "add_subcommands"),
                         ("tuneforge.report", "add_subcommands"),
                         ("tuneforge.compare", "add_subcommands"), ("tuneforge.recommend", "add_subcommands")):
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


def _config_help() -> str:
    """Every run key, then every method's and objective's options under their declared flag prefix."""
    from .methods.base import METHODS
    from .objectives.base import OBJECTIVES

    lines = [f"  --{name.replace('_', '-'):<32} {f.description}" for name, f in RunConfig.model_fields.items()]
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
