"""``tuneforge eval``: held-out metrics of a base model (+ adapter) — perplexity and exact match, preference
accuracy, or lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..errors import ConfigError
from .common import inference_args, inference_dtype


def add_subcommands(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity and exact match (chat, text); reward or implicit-reward accuracy "
                        "and margins (preference pairs); lm-evaluation-harness benchmarks (--tasks)")
    inference_args(ev)
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


def cmd_eval(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
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
