"""``tuneforge studio``: the browser UI over a workspace folder (tuneforge.studio). Thin: parse flags, read the key,
serve."""

from __future__ import annotations

import argparse


def add_subcommands(sub) -> None:
    p = sub.add_parser("studio", help="a web UI to plan, check data, train, watch, compare, chat and export "
                       "(pip install 'tuneforge[studio]')",
                       description="Serves a Gradio page on 127.0.0.1. Every path it reads or writes lies in the "
                       "workspace; runs are `tuneforge train` processes writing run folders there.")
    p.add_argument("--workspace", default=".", help="the folder every path must lie in (default: the current one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--key-file", help="ask for the key on this file's first line before showing the page (default: "
                   "$TUNEFORGE_STUDIO_KEY; no key: no login)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once; the rest wait in order (default 1)")
    p.set_defaults(func=run_studio)


def run_studio(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    try:
        from ..studio.server import create, launch, read_key
    except ModuleNotFoundError as e:
        if e.name not in ("gradio", "pandas"):
            raise
        raise ConfigError("tuneforge studio needs Gradio: pip install 'tuneforge[studio]'") from None
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {args.parallel}")
    key = read_key(args.key_file)
    studio, blocks = create(args.workspace, parallel=args.parallel)
    try:
        launch(blocks, host=args.host, port=args.port, key=key, share=args.share)
    finally:
        studio.close()  # the runs go on: they are run folders, a restarted studio shows them again
    return 0
