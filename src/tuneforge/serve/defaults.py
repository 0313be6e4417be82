"""The server's default limits, shared by ``app.create_app`` and the ``serve`` command's flags. A module of its own
with no imports, so that ``tuneforge --help`` does not import FastAPI."""

DEFAULT_MAX_TOKENS = 512
"""Completion tokens of a chat request that names no max_tokens (never more than the context leaves): enough for an
answer, not a whole context of generation that the requests behind it wait for."""
MAX_BODY_BYTES = 1 << 20
"""Largest request body (1 MiB): far above any prompt a served context holds, far below what hurts the server."""
BODY_TIMEOUT_S = 30.0
"""Seconds a request body may take to arrive in full: past that it is a stuck or hostile (slowloris) client."""
SHUTDOWN_TIMEOUT_S = 5.0
"""Seconds requests in flight get to finish on SIGTERM / Ctrl-C before they are cancelled."""
