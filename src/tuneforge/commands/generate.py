"""``tuneforge generate``: answers of a base model (+ adapter) to one prompt or a file of prompts."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from ..outputs import check_output, staged_file
from .common import inference_args, inference_dtype

log = logging.getLogger("tuneforge")


def add_subcommands(sub) -> None:
    gen = sub.add_parser("generate", help="generate answers with a base model (+ adapter)")
    inference_args(gen)
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


def cmd_generate(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
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
