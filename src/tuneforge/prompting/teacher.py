"""Teachers: who writes the synthetic data. An OpenAI-compatible HTTP server, or a local model via tuneforge.

Both offer ``complete_many(list of chat prompts, temperature=, max_tokens=) -> list[str | TeacherRequestError]``:
order is kept, and a request that failed for good comes back as its error instead of raising, so one bad
request never loses the rest of a batch.

The HTTP client uses only the standard library. Each request gets a socket timeout; timeouts, connection
errors, 429 (waiting at least its Retry-After), 5xx and malformed replies are retried with exponential backoff
and jitter. 401/403/404 mean the URL, key or model name is wrong, which no retry fixes, so they stop the run
(:class:`TeacherConfigError`). A teacher nobody answers for stops the run too (:class:`TeacherUnreachableError`):
before any reply, as soon as the client has failed to connect as many times as one request may try; after replies,
when one request has spent all its retries failing to connect. Every other job would only repeat that wait.
The API key is sent as a bearer header and appears in no message, log or repr.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from .template import Message

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 300.0  # a server asking for longer than this is treated as asking for this


class TeacherRequestError(RuntimeError):
    """One request failed for good (retries exhausted, or an error no retry fixes)."""


class TeacherConfigError(RuntimeError):
    """The teacher rejects every request (bad URL, API key or model name): stop instead of failing each job."""


class TeacherUnreachableError(TeacherConfigError):
    """No connection to the teacher (refused, unknown host, no route): stop instead of failing each job."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, connection: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.connection = connection  # no connection was made: nothing answered at all


class TeacherClient:
    """An OpenAI-compatible chat-completions client with bounded concurrency and retries.

    ``base_url`` is the API root (``http://127.0.0.1:8000/v1``); requests go to ``{base_url}/chat/completions``.
    ``backoff_base`` doubles per attempt up to ``backoff_max``; the wait is drawn from [½, 1] of that
    ("equal jitter"), so many clients that failed together do not retry together.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        concurrency: int = 4,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        seed: int | None = None,
        sleep: Callable[[float], None] | None = None,
    ):
        _check_options(base_url, timeout, max_retries)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.concurrency = max(1, concurrency)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._rng = random.Random(seed)
        self._stop = threading.Event()  # set once the teacher is unreachable: wakes every backoff wait
        self._sleep = sleep or self._stop.wait
        self._lock = threading.Lock()
        self._answered = False  # some request got an HTTP reply (any status)
        self._connect_failures = 0  # failed connections since the last reply
        self._unreachable: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.requests_sent = 0
        self.retries = 0

    def __repr__(self) -> str:  # never the key
        return f"TeacherClient(url={self.url!r}, model={self.model!r})"

    @property
    def name(self) -> str:
        return self.model

    def provenance(self) -> dict[str, Any]:
        """Recorded in every record's ``meta.teacher``: URL (without any user:password part) and model."""
        parts = urllib.parse.urlsplit(self.url)
        url = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl() \
            if parts.username or parts.password else self.url
        return {"kind": "http", "url": url, "model": self.model}

    def complete(self, messages: Sequence[Message], *, temperature: float = 0.7, max_tokens: int = 512) -> str:
        """One chat completion's text; raises :class:`TeacherRequestError` once retries are exhausted."""
        body = json.dumps({"model": self.model, "messages": list(messages), "temperature": temperature,
                           "max_tokens": max_tokens}).encode("utf-8")
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if self._unreachable:
                raise TeacherUnreachableError(self._unreachable)
            if attempt:
                with self._lock:
                    self.retries += 1
            try:
                return self._post(body)
            except _Retryable as e:
                last = str(e)
                if e.connection:
                    self._connection_failed(last, exhausted=attempt == self.max_retries)
                if attempt == self.max_retries:
                    break
                delay = self._backoff(attempt, e.retry_after)
                log.debug("teacher request failed (%s); retry %d in %.2fs", last, attempt + 1, delay)
                self._sleep(delay)
        raise TeacherRequestError(f"gave up after {self.max_retries + 1} attempts; last error: {last}")

    def complete_many(self, prompts: Sequence[Sequence[Message]], *, temperature: float = 0.7,
                      max_tokens: int = 512) -> list[str | TeacherRequestError]:
        """Complete all ``prompts`` with at most ``concurrency`` requests in flight; order is kept."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teacher")

        def one(messages: Sequence[Message]) -> str | TeacherRequestError:
            try:
                return self.complete(messages, temperature=temperature, max_tokens=max_tokens)
            except TeacherRequestError as e:
                return e

        return list(self._executor.map(one, prompts))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _connection_failed(self, reason: str, exhausted: bool) -> None:
        """Count a failed connection; raise :class:`TeacherUnreachableError` (and wake every waiting request) when
        the teacher counts as unreachable (see the module docstring)."""
        with self._lock:
            self._connect_failures += 1
            n = self._connect_failures
            if self._unreachable is None and n > self.max_retries and (exhausted or not self._answered):
                never = ", and it has not answered any request" if not self._answered else ""
                self._unreachable = (f"{self.url}: the teacher is unreachable: {n} connection attempts in a row "
                                     f"failed{never} (last: {reason}); is the server running at that URL?")
                self._stop.set()
        if self._unreachable:
            raise TeacherUnreachableError(self._unreachable)

    def _reached(self) -> None:
        with self._lock:
            self._answered = True
            self._connect_failures = 0

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * (2 ** attempt))
        with self._lock:
            delay *= 0.5 + 0.5 * self._rng.random()
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests_sent += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            self._reached()
            self._raise_for_status(e)
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timed out after {self.timeout:g}s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.timeout:g}s") from None
            # urllib wraps errors of the connect step (refused, unknown host, no route) in URLError: no server
            # answered. A reset while reading the reply (below) means one did.
            raise _Retryable(f"connection error: {e.reason}", connection=True) from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
        self._reached()
        return _content(raw)

    def _raise_for_status(self, error: urllib.error.HTTPError) -> None:
        status = error.code
        detail = _error_detail(error)
        error.close()
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}{detail}", _retry_after(error.headers.get("Retry-After"))) from None
        if status in (401, 403):
            raise TeacherConfigError(f"{self.url}: HTTP {status}: the teacher rejected the API key{detail}")
        if status == 404:
            raise TeacherConfigError(f"{self.url}: HTTP 404: wrong URL or unknown model {self.model!r}{detail}")
        raise TeacherRequestError(f"HTTP {status}{detail}")  # e.g. 400 prompt too long: this job only


def _check_options(base_url: str, timeout: float, max_retries: int) -> None:
    """Refuse settings that cannot work before any request: a URL urllib would read as a local file or FTP,
    a negative retry count (zero attempts), a timeout that makes every request fail at once."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"teacher URL {base_url!r}: expected an http:// or https:// URL with a host "
                         "(e.g. http://127.0.0.1:8000/v1)")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max retries must be a whole number >= 0 (0: one attempt, no retry), got {max_retries!r}")
    if not timeout > 0:
        raise ValueError(f"teacher timeout must be > 0 seconds, got {timeout!r}")


def _content(raw: bytes) -> str:
    """``choices[0].message.content`` of a reply; anything else is a malformed reply (retried)."""
    try:
        reply = json.loads(raw.decode("utf-8"))
        content = reply["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise _Retryable(f"malformed reply ({type(e).__name__}): {raw[:120]!r}") from None
    if not isinstance(content, str):
        raise _Retryable(f"malformed reply: message content is {type(content).__name__}")
    return content


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read(300).decode("utf-8", "replace").strip()
    except Exception:  # the body of an error reply is a courtesy; never let reading it mask the status
        return ""
    return f": {body}" if body else ""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class LocalTeacher:
    """A local model as teacher, through ``tuneforge.inference.generate`` (batched, not threaded)."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "local", batch_size: int = 8, seed: int = 0,
                 generate_fn: Callable[..., list[str]] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self._name = name
        self.batch_size = batch_size
        self.concurrency = batch_size  # the pipeline sizes its windows from this
        self.seed = seed
        self._generate_fn = generate_fn
        self._calls = 0
        self.requests_sent = 0
        self.retries = 0

    @property
    def name(self) -> str:
        return self._name

    def provenance(self) -> dict[str, Any]:
        return {"kind": "local", "model": self._name}

    def complete_many(self, prompts: Sequence[Sequence[Message]], *, temperature: float = 0.7,
                      max_tokens: int = 512) -> list[str | TeacherRequestError]:
        generate = self._generate_fn
        if generate is None:
            from tuneforge.inference.generate import generate
        self._calls += 1
        self.requests_sent += len(prompts)
        # A fresh seed per call: the same seed for every window would repeat the same sampling noise.
        sampling = dict(do_sample=True, temperature=temperature, top_p=0.95) if temperature > 0 else {}
        return list(generate(self.model, self.tokenizer, [list(p) for p in prompts], max_new_tokens=max_tokens,
                             batch_size=self.batch_size, seed=self.seed + self._calls, **sampling))

    def close(self) -> None:
        pass
