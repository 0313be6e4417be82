"""``tuneforge verify RUN --against ARTEFACT``: an export compared with the run it came from."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence


def add_subcommands(sub) -> None:
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


def cmd_verify(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from ..artifacts.verify import format_summary, verify

    summary = verify(args.run, args.against, model=args.model, device=args.device, n_prompts=args.prompts,
                     max_new_tokens=args.max_new_tokens, precision=args.precision, served_model=args.served_model,
                     api_key=args.api_key or os.environ.get("TUNEFORGE_API_KEY"), output=args.output)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0 if summary["passed"] else 1
