"""``tuneforge serve`` and ``tuneforge export``: the deployment commands, registered by the main CLI through
``add_subcommands``. Thin: parse flags, call ``serve.app.create_app`` / ``export.export``."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)

API_KEY_ENV = "TUNEFORGE_API_KEY"


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    _add_serve(subparsers)
    _add_export(subparsers)


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=DIR, got {text!r}")
    return name, path


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server: one base model, many adapters (needs the serve extra)",
                       description="Serve --model and every --adapter over it. A request's `model` field picks an "
                       "adapter by NAME, or the base by its name (--base-name). LoRA adapters share batches; other "
                       "methods get their own batches. Add / remove adapters at runtime: POST / DELETE "
                       "/v1/admin/adapters.")
    p.add_argument("--model", help="base model: embedded name, HF directory, .gguf or hub id (default: the first "
                   "adapter's recorded base, else the embedded model)")
    p.add_argument("--adapter", action="append", type=_adapter_pair, default=[], metavar="NAME=DIR",
                   help="an adapter to serve under NAME (repeatable)")
    p.add_argument("--base-name", help="the `model` name of the bare base (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429 (default 64)")
    p.add_argument("--max-batch-size", type=int, default=8, help="rows (choices) generated together (default 8)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: the model's loader default)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import uvicorn

    from ..inference import default_model, load_for_inference
    from .app import create_app

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("two --adapter flags use the same NAME")
    model_name = default_model(next(iter(adapters.values()), None), args.model)
    model, tokenizer, _ = load_for_inference(model_name, None, device=args.device, dtype=args.dtype)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who reaches this port can use the model", args.host)
    app = create_app(model, tokenizer, args.base_name or model_name, adapters, api_key=api_key,
                     max_queue=args.max_queue, max_batch_size=args.max_batch_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run for another runtime: GGUF (llama.cpp), an Ollama folder (GGUF + "
                       "Modelfile) or vLLM's layout; then verify it against the run (tuneforge verify)")
    p.add_argument("run", help="the run / adapter directory (or a whole-model directory)")
    p.add_argument("--format", required=True, choices=["gguf", "ollama", "vllm"])
    p.add_argument("--output", help="file (gguf) or directory (ollama, vllm); default beside the run")
    p.add_argument("--dtype", default="f16", choices=["f16", "bf16", "f32", "q8_0"], help="GGUF tensor type")
    p.add_argument("--model", help="base model (default: the one the run was trained on)")
    p.add_argument("--device")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the artefact with the run (agreement, "
                   "KL, tokenizer; summary in verify.json beside it); a failed check exits 1")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from ..export import export

    result = export(args.run, args.format, output=args.output, dtype=args.dtype, model=args.model, device=args.device,
                    overwrite=args.overwrite, verify=not args.no_verify)
    print(result.summary())
    return 0 if result.passed else 1
