"""Starting the studio: the workspace, the job queue and the page, served safely by default.

* It binds 127.0.0.1 unless told otherwise (``--host``); on another address without a key it warns, as serve does.
* With a key (``$TUNEFORGE_STUDIO_KEY`` or the first line of ``--key-file``) the page asks for it at a login form
  (any user name, the key as password), compared in constant time.
* Gradio's public share link is off unless ``--share``; its usage analytics are off.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

KEY_ENV = "TUNEFORGE_STUDIO_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def read_key(key_file: str | None) -> str | None:
    """The access key: the first line of ``key_file``, else ``$TUNEFORGE_STUDIO_KEY``; None: no login."""
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"--key-file {key_file}: {e.strerror}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"--key-file {key_file}: the first line is empty")
        return key
    return os.environ.get(KEY_ENV) or None


def key_checker(key: str):
    """Gradio's ``auth`` callable: any user name, the key as password."""
    expected = key.encode()
    return lambda _user, password: hmac.compare_digest((password or "").encode(), expected)


def create(workspace: str | Path = ".", parallel: int = 1):
    """The studio over ``workspace`` (its queue worker started) and its Gradio Blocks."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .actions import Studio
    from .jobs import Jobs
    from .ui import build
    from .workspace import Workspace

    root = Workspace(workspace)
    jobs = Jobs(root, parallel=parallel)
    jobs.start()
    studio = Studio(root, jobs)
    return studio, build(studio)


def launch(blocks: Any, host: str = "127.0.0.1", port: int | None = None, key: str | None = None,
           share: bool = False, block: bool = True) -> str:
    """Serve the page; returns its local URL (``block=False``: at once, serving from a thread)."""
    from .ui import CSS

    if host not in LOCAL_HOSTS and not key:
        log.warning("studio on %s without a key: anyone who reaches this port can train and run commands in the "
                    "workspace; set $%s or --key-file", host, KEY_ENV)
    blocks.queue(default_concurrency_limit=4)
    _, url, _ = blocks.launch(server_name=host, server_port=port, share=bool(share),
                              auth=key_checker(key) if key else None,
                              auth_message="tuneforge studio: any user name, the studio's key as password",
                              prevent_thread_lock=not block, quiet=not block, ssr_mode=False, css=CSS,
                              footer_links=[], show_error=True)
    return url
