"""``tuneforge serve`` and ``tuneforge export``: the deployment commands, registered by the main CLI through
``add_subcommands``. Thin: parse flags, call ``serve.app.create_app`` / ``export.export``."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..serve.defaults import BODY_TIMEOUT_S, DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, SHUTDOWN_TIMEOUT_S

log = logging.getLogger(__name__)

API_KEY_ENV = "TUNEFORGE_API_KEY"
DTYPES = ["float32", "bfloat16", "float16", "auto"]  # what models.load_model takes


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    _add_serve(subparsers)
    _add_export(subparsers)


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=DIR, got {text!r}")
    return name, path


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:  # the OS would bind a port of its own choosing, or fail, for anything else
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return port


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server: one base model, many adapters (needs the serve extra)",
                       description="Serve --model and every --adapter over it. A request's `model` field picks an "
                       "adapter by NAME, or the base by its name (--base-name). LoRA adapters share batches; other "
                       "methods get their own batches. With an API key, add / remove adapters at runtime: POST / "
                       "DELETE /v1/admin/adapters.")
    p.add_argument("--model", help="base model: embedded name, HF directory, .gguf or hub id (default: the first "
                   "adapter's recorded base, else the embedded model)")
    p.add_argument("--adapter", action="append", type=_adapter_pair, default=[], metavar="NAME=DIR",
                   help="an adapter to serve under NAME (repeatable); refused when trained on another base")
    p.add_argument("--base-name", help="the `model` name of the bare base (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="0 to 65535; 0 lets the OS pick (default 8000)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`; visible to every local "
                     f"user in `ps`: prefer --api-key-file or ${API_KEY_ENV}")
    key.add_argument("--api-key-file", metavar="PATH", help="read the API key from the first line of PATH")
    p.add_argument("--allow-admin-without-key", action="store_true", help="enable the admin routes (loading "
                   "adapters from any path the server can read) without an API key: for a trusted machine only")
    p.add_argument("--max-queue", type=_positive(int), default=64,
                   help="prompts that may wait (a request with a list of prompts counts each); more get 429 "
                   "(default 64)")
    p.add_argument("--max-batch-size", type=_positive(int), default=8,
                   help="rows (choices) generated together (default 8)")
    p.add_argument("--default-max-tokens", type=_positive(int), default=DEFAULT_MAX_TOKENS,
                   help=f"completion tokens of a chat request that names no max_tokens, at most what the context "
                   f"leaves (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--max-body-bytes", type=_positive(int), default=MAX_BODY_BYTES,
                   help=f"larger request bodies get 413 (default {MAX_BODY_BYTES})")
    p.add_argument("--body-timeout", type=_positive(float), default=BODY_TIMEOUT_S, metavar="SECONDS",
                   help=f"a request body must arrive within this, else 408 (default {BODY_TIMEOUT_S:g})")
    p.add_argument("--shutdown-timeout", type=_positive(float), default=SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, requests in flight get this long to finish, then are cancelled "
                   f"(default {SHUTDOWN_TIMEOUT_S:g})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="the base model's dtype (default: the model's loader default)")
    p.set_defaults(func=run_serve)


def read_api_key(args) -> str | None:
    """--api-key, else the first line of --api-key-file, else $TUNEFORGE_API_KEY; None when none is set."""
    if args.api_key_file:
        lines = Path(args.api_key_file).read_text().splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the first line is empty")
        return key
    if args.api_key:
        log.warning("--api-key is visible to every user of this machine (ps); prefer --api-key-file or $%s",
                    API_KEY_ENV)
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def run_serve(args) -> int:
    import uvicorn

    from ..inference.loading import default_model, load_for_inference
    from ..models.loading import model_fingerprint
    from ..serve.app import create_app
    from ..serve.registry import describe_adapter

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("two --adapter flags use the same NAME")
    api_key = read_api_key(args)
    for path in adapters.values():  # a typo fails now, not after the model has loaded
        describe_adapter(Path(path))
    model_name = default_model(next(iter(adapters.values()), None), args.model)
    model, tokenizer, _ = load_for_inference(model_name, None, device=args.device, dtype=args.dtype)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who reaches this port can use the model", args.host)
    app = create_app(model, tokenizer, args.base_name or model_name, adapters, api_key=api_key,
                     max_queue=args.max_queue, max_batch_size=args.max_batch_size,
                     default_max_tokens=args.default_max_tokens, max_body_bytes=args.max_body_bytes,
                     body_timeout=args.body_timeout, allow_admin_without_key=args.allow_admin_without_key,
                     base_fingerprint=model_fingerprint(model_name))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.shutdown_timeout)
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
    from ..artifacts.export import export

    result = export(args.run, args.format, output=args.output, dtype=args.dtype, model=args.model, device=args.device,
                    overwrite=args.overwrite, verify=not args.no_verify)
    print(result.summary())
    return 0 if result.passed else 1
