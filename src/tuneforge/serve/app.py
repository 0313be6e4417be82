"""The OpenAI-compatible HTTP API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (SSE streaming or
not), ``/v1/admin/adapters`` to add and remove adapters at runtime, and vLLM's ``/tokenize`` / ``/detokenize``.

What evaluation harnesses need is here: a completion request may hold a list of prompts (strings or token ids),
``echo`` them and return ``logprobs`` for prompt and completion tokens (lm-eval's ``local-completions`` scores
multiple-choice answers so); chat requests return ``logprobs`` / ``top_logprobs``.

A request's ``model`` names an adapter or the base. Errors carry OpenAI's body, ``{"error": {"message", "type",
"param", "code"}}``, so the official clients raise their usual exceptions: 400 for a malformed or out-of-range
request (and a prompt that does not fit the context), 401 without the right bearer token when the server has an API
key (every route but ``/health``), 403 from the admin routes when they are off, 404 for an unknown model, 408 for a
body slower than ``body_timeout``, 413 for a body larger than ``max_body_bytes``, 429 when the queue is full (a
request's prompts count one each, and queue all or none), 500 when generation fails.

What one client can cost the others is bounded: a body's size and the time it may take to arrive, the tokens a
request generates when it names no limit (``default_max_tokens``), the requests that may wait (``max_queue``), and
a client that hangs up cancels its generation. Tokenising runs off the event loop, so ``/health`` and every other
request keep answering while a long prompt is tokenised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import threading
import time
import uuid
from typing import Annotated, Any, AsyncIterator, ClassVar, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn

from ..data.template import ensure_chat_template, prompt_ids
from ..models.loading import model_fingerprint
from .defaults import BODY_TIMEOUT_S, DEFAULT_MAX_TOKENS, MAX_BODY_BYTES
from .engine import Row, TokenLogprob
from .registry import SHARED, AdapterRegistry
from .scheduler import QueueFull, Request, Scheduler

log = logging.getLogger(__name__)

MAX_CHOICES = 16  # n: more choices than this is a mistake, not a use
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 5  # OpenAI's limit on a completion's logprobs (alternatives per token)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on a chat completion's top_logprobs
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request asks whether its client is still there
# Options a client may send that tuneforge does not implement: refused when set to anything but their default,
# rather than silently ignored.
UNSUPPORTED = ("logit_bias", "tools", "tool_choice", "functions", "function_call", "response_format",
               "presence_penalty", "frequency_penalty", "suffix")


class APIError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


class BodyRefused(StarletteHTTPException):
    """A request body too large (413) or too slow (408), raised while it is read. FastAPI hands HTTPExceptions to the
    app's handlers (anything else raised while reading becomes a bare 400); the answer closes the connection, so the
    rest of the body is never read."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message, headers={"Connection": "close"})
        self.error = error


# -- request bodies ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    unsupported: ClassVar[tuple[str, ...]] = UNSUPPORTED

    # OpenAI's types, strictly: "4" or true is not a number and 1 is not a boolean (400, as OpenAI answers);
    # StrictFloat takes ints, as OpenAI does (temperature: 1).
    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1)  # vLLM's convention: -1 or 0 (or none) keep every token
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in cls.unsupported:
                if data.get(key) not in (None, False, 0, "", [], {}, "none", "auto") and key in data:
                    raise ValueError(f"{key!r} is not supported by tuneforge serve")
            if data.get("best_of") not in (None, 1):
                raise ValueError("'best_of' is not supported by tuneforge serve")
        return data

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}", param="stop")
        return stops

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampling):
    unsupported = (*UNSUPPORTED, "echo")
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(Sampling):
    unsupported = (*UNSUPPORTED, "top_logprobs")
    # OpenAI's four shapes: one prompt as text or token ids, or a list of either (one choice per prompt and n).
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                              Field(min_length=1)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1)])
    max_tokens: StrictInt | None = Field(16, ge=0)  # OpenAI's default for completions; 0 (with echo): scoring only
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list (of strings, or of token-id lists)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a text prompt or a chat conversation (with the generation prompt, as served)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True

    @model_validator(mode="after")
    def one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[StrictInt]


class AdapterBody(BaseModel):
    name: str
    path: str


# -- the app -----------------------------------------------------------------------------------------


def context_length(model: nn.Module) -> int:
    config = getattr(model.config, "text_config", model.config)
    length = getattr(config, "max_position_embeddings", None)
    if not length:
        raise ValueError(f"{type(model).__name__}'s config names no max_position_embeddings: the context is unknown")
    return int(length)


def create_app(model: nn.Module, tokenizer: Any, base_name: str, adapters: dict[str, str] | None = None, *,
               api_key: str | None = None, max_queue: int = 64, max_batch_size: int = 8,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout: float = BODY_TIMEOUT_S, allow_admin_without_key: bool = False,
               base_fingerprint: str | None = None) -> FastAPI:
    """An app serving ``model`` (under ``base_name``) and ``adapters`` (name -> directory) over it. The scheduler's
    worker starts and stops with the app (its lifespan); ``app.state.scheduler`` / ``.registry`` expose them.

    ``default_max_tokens`` caps a chat request that names no ``max_tokens`` (never beyond the context it leaves);
    ``max_body_bytes`` / ``body_timeout`` bound a request body's size and arrival time. The admin routes (adding
    adapters from server paths) exist only with an ``api_key`` or ``allow_admin_without_key``. Adapters trained on
    another base than ``base_fingerprint`` (``models.model_fingerprint``; default: that of ``model.name_or_path``)
    are refused."""
    if default_max_tokens < 1 or max_body_bytes < 1 or body_timeout <= 0:
        raise ValueError(f"default_max_tokens ({default_max_tokens}), max_body_bytes ({max_body_bytes}) and "
                         f"body_timeout ({body_timeout}) must be positive")
    ensure_chat_template(tokenizer)
    model.eval()
    if base_fingerprint is None:
        base_fingerprint = model_fingerprint(str(model.name_or_path)) if model.name_or_path else None
    registry = AdapterRegistry(model, tokenizer, base_name, base_fingerprint)
    for name, path in (adapters or {}).items():
        registry.add(name, path)
    scheduler = Scheduler(registry, max_queue=max_queue, max_batch_size=max_batch_size)
    api = _API(registry, scheduler, context_length(model), default_max_tokens, detailed_admin_errors=bool(api_key))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()  # cancels what still waits or runs: shutdown takes seconds, not a generation's length

    # No /docs, /redoc or /openapi.json: the docs page loads JavaScript from a CDN, and both would answer without
    # the key. The API is OpenAI's, documented there.
    app = FastAPI(title="tuneforge serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.scheduler = registry, scheduler
    _add_error_handlers(app)
    # Added last = runs first: the key is checked before a byte of the body is read.
    app.add_middleware(_BodyLimits, max_bytes=max_body_bytes, timeout=body_timeout)
    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/v1/models")(api.list_models)
    app.get("/v1/models/{name:path}")(api.get_model)
    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/completions")(api.completions)
    app.post("/tokenize")(api.tokenize)
    app.post("/detokenize")(api.detokenize)
    _add_admin_routes(app, api, enabled=bool(api_key) or allow_admin_without_key)
    return app


def _add_admin_routes(app: FastAPI, api: "_API", enabled: bool) -> None:
    """Adding an adapter loads files from a path the caller names: without a key anyone who reaches the port could
    probe the server's disk, so the routes answer 403 unless a key guards them or the operator opted in."""
    if enabled:
        app.post("/v1/admin/adapters", status_code=201)(api.add_adapter)
        app.delete("/v1/admin/adapters/{name:path}")(api.remove_adapter)
        return

    async def off() -> None:
        raise APIError(403, "the admin routes are off: start the server with an API key (--api-key-file or "
                       "$TUNEFORGE_API_KEY), or with --allow-admin-without-key", type="permission_error")

    app.api_route("/v1/admin/{rest:path}", methods=["GET", "POST", "DELETE"])(off)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                            code="invalid_json").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        param = ".".join(loc) or None
        return APIError(400, f"{param}: {message}" if param else message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e, BodyRefused):
            return e.error.response(e.headers)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response(e.headers)

    @app.exception_handler(Exception)
    async def crashed(_: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()


GUARDED = ("/v1", "/tokenize", "/detokenize")  # every route but /health needs the key


class _BearerAuth:
    """With a key, every /v1 route needs ``Authorization: Bearer KEY``, checked from the headers alone: a caller
    without the key never gets its body read. (A plain ASGI middleware: Starlette's BaseHTTPMiddleware would run
    the app in another task and hide the client's disconnect from it.)"""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(GUARDED):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):  # constant time: no key guessing by timing
                what = "Incorrect API key provided" if given else "Missing bearer token (Authorization header)"
                await APIError(401, what, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimits:
    """Every request body: at most ``max_bytes`` (413, answered from Content-Length before a byte is read, else as
    soon as the bytes that arrived pass it) and ``timeout`` seconds to arrive in full (408: a client trickling bytes
    cannot hold a connection open and its request half-read for ever). Memory per request stays ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refusal(413).response({"Connection": "close"})(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._limited(receive), tracked_send)
        except BodyRefused as e:  # raised outside a route's body parsing (FastAPI's handlers answer the rest)
            if started:
                raise
            await e.error.response(e.headers)(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        deadline = time.monotonic() + self.timeout
        received, complete = 0, False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: only the client's disconnect can come, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyRefused(self._refusal(408)) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyRefused(self._refusal(413))
                complete = not message.get("more_body", False)
            return message

        return limited_receive

    def _refusal(self, status: int) -> APIError:
        if status == 413:
            return APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                            "(--max-body-bytes)", code="request_too_large")
        return APIError(408, f"the request body did not arrive within {self.timeout:g} s (--body-timeout)",
                        code="request_timeout")


class _API:
    def __init__(self, registry: AdapterRegistry, scheduler: Scheduler, context: int, default_max_tokens: int,
                 detailed_admin_errors: bool):
        self.registry, self.scheduler, self.context = registry, scheduler, context
        self.default_max_tokens = default_max_tokens
        # Only a key holder may learn why a path cannot be served (which paths exist, what they hold).
        self.detailed_admin_errors = detailed_admin_errors
        self.tokenizer = registry.tokenizer
        # One encode at a time: the Rust tokenizer refuses a second thread while it changes its settings.
        self._tokenizer_lock = threading.Lock()
        self.created = int(time.time())

    # -- models and adapters -------------------------------------------------------------------------
    def _model_card(self, name: str) -> dict[str, Any]:
        adapter = self.registry.adapters.get(name)
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "tuneforge"}
        if adapter is not None:
            card.update(root=self.registry.base_name, parent=self.registry.base_name, method=adapter.method,
                        batched_with_other_adapters=adapter.group == SHARED)
        return card

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card(n) for n in self.registry.names()]}

    async def get_model(self, name: str) -> dict[str, Any]:
        self._resolve(name)
        return self._model_card(name)

    async def add_adapter(self, body: AdapterBody) -> dict[str, Any]:
        try:
            self.registry.check_name(body.name)
        except ValueError as e:
            raise APIError(400, str(e), param="name") from None
        try:
            await run_in_threadpool(self.registry.add, body.name, body.path)
        except Exception as e:
            raise self._admin_error(body, e) from None
        return self._model_card(body.name)

    def _admin_error(self, body: AdapterBody, e: Exception) -> APIError:
        if not self.detailed_admin_errors:  # the same answer whether the path is missing, unreadable or malformed
            log.warning("cannot add adapter %r from %s: %s: %s", body.name, body.path, type(e).__name__, e)
            return APIError(400, f"cannot add adapter {body.name!r}: the path is not a servable adapter directory "
                            "(the server log says why)", param="path")
        if isinstance(e, (ValueError, KeyError, OSError)):
            message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() is its repr
            return APIError(400, f"cannot add adapter {body.name!r}: {message}", param="path")
        log.exception("adding adapter %r failed", body.name)
        return APIError(500, f"cannot add adapter {body.name!r}: {type(e).__name__}: {e}", type="server_error")

    async def remove_adapter(self, name: str) -> dict[str, Any]:
        if name not in self.registry.adapters:
            raise APIError(404, f"no adapter named {name!r} is served", type="not_found_error",
                           code="model_not_found")
        await run_in_threadpool(self.registry.remove, name)
        return {"id": name, "object": "model", "deleted": True}

    def _resolve(self, name: str):
        try:
            return self.registry.resolve(name)
        except KeyError:
            raise APIError(404, f"The model `{name}` does not exist; served: {', '.join(self.registry.names())}",
                           type="not_found_error", param="model", code="model_not_found") from None

    # -- tokenization --------------------------------------------------------------------------------
    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            self._resolve(body.model)
        if body.messages is not None:
            try:
                ids = await self._encode(prompt_ids, self.tokenizer, [m.as_message() for m in body.messages])
            except Exception as e:
                raise APIError(400, f"messages: the chat template rejects them: {e}", param="messages") from None
        else:
            ids = (await self._encode(self.tokenizer, body.prompt,
                                      add_special_tokens=body.add_special_tokens))["input_ids"]
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            self._resolve(body.model)
        if any(t < 0 or t >= len(self.tokenizer) for t in body.tokens):
            raise APIError(400, f"tokens: token ids must lie in [0, {len(self.tokenizer)})", param="tokens")
        return {"prompt": await self._encode(self.tokenizer.decode, body.tokens)}

    # -- generation ----------------------------------------------------------------------------------
    async def chat(self, body: ChatRequest, http: HTTPRequest):
        adapter = self._resolve(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        if body.stream and body.logprobs:
            raise APIError(400, "stream: streaming with logprobs is not supported; ask without stream",
                           param="stream")
        try:
            ids = await self._encode(prompt_ids, self.tokenizer, [m.as_message() for m in body.messages])
        except Exception as e:  # the chat template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template rejects them: {e}", param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        call = self._submit(body, adapter, [ids], limit, "messages",
                            logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        shape = _Chat(body.model, [ids], self.tokenizer, (body.top_logprobs or 0) if body.logprobs else None)
        if body.stream:
            return _sse(self._stream(call, shape, body.include_usage()))
        return await self._collect(call, shape, http)

    async def completions(self, body: CompletionRequest, http: HTTPRequest):
        adapter = self._resolve(body.model)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 is for scoring the prompt: it needs echo: true", param="max_tokens")
        if body.stream and (body.echo or body.logprobs is not None):
            raise APIError(400, "stream: streaming with echo or logprobs is not supported; ask without stream",
                           param="stream")
        prompts = body.prompts()
        if isinstance(prompts[0], str):
            ids = (await self._encode(self.tokenizer, prompts, add_special_tokens=True))["input_ids"]
        else:
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for p in prompts for t in p):
                raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", param="prompt")
            ids = [list(p) for p in prompts]
        call = self._submit(body, adapter, ids, body.max_tokens, "prompt", logprobs=body.logprobs,
                            prompt_logprobs=body.echo and body.logprobs is not None)
        texts = prompts if isinstance(prompts[0], str) else None
        shape = _Completion(body.model, ids, self.tokenizer, body.logprobs, body.echo, texts, body.n)
        if body.stream:
            return _sse(self._stream(call, shape, body.include_usage()))
        return await self._collect(call, shape, http)

    async def _encode(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in a worker thread: a long prompt takes seconds to tokenise, and the event loop
        must keep answering meanwhile."""
        def locked():
            with self._tokenizer_lock:
                return fn(*args, **kwargs)

        return await run_in_threadpool(locked)

    def _submit(self, body: Sampling, adapter, prompts: list[list[int]], max_tokens: int | None, param: str,
                logprobs: int | None = None, prompt_logprobs: bool = False) -> "_Call":
        """Queue ``n`` rows per prompt (choice ``p * n + i`` is prompt p's i-th), all prompts or none."""
        if len(prompts) > self.scheduler.max_queue:
            raise APIError(400, f"{param}: {len(prompts)} prompts exceed the server's --max-queue "
                           f"{self.scheduler.max_queue}", param=param)
        reserved = adapter.reserved_positions if adapter is not None else 0
        limit = max_tokens
        for ids in prompts:
            room = self.context - reserved - len(ids)
            if max_tokens is None:
                # OpenAI's chat default is whatever the context leaves: with a long context, one request that forgot
                # max_tokens would hold its batch (and everyone queued behind it) for minutes.
                limit = max(1, min(self.default_max_tokens, room))
            if not ids:
                raise APIError(400, f"{param}: the prompt is empty", param=param)
            if limit > room or room < 0:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens; the request "
                               f"needs {len(ids)} prompt + {reserved} virtual + {limit} completion tokens",
                               param=param, code="context_length_exceeded")
        loop, events, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        stops = body.stops()
        top_k = max(body.top_k or 0, 0)
        call = _Call([], [], events)
        for ids in prompts:
            request = Request(adapter.name if adapter else None, adapter.group if adapter else SHARED, [], loop,
                              events, cancelled, first=len(call.rows))
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i  # n choices: n different draws, each reproducible
                choice = len(call.rows)
                row = Row(list(ids), limit, body.temperature, body.top_p, top_k, seed, stops,
                          emit=lambda text, choice=choice, request=request: request.send("text", choice, text),
                          cancelled=cancelled.is_set, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                request.rows.append(row)
                call.rows.append(row)
            call.requests.append(request)
        try:
            self.scheduler.submit(*call.requests)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param="n") from None
        return call

    async def _collect(self, call: "_Call", shape: "_Shape", http: HTTPRequest) -> dict[str, Any]:
        """Wait for every choice; cancel the generation when the client disconnects meanwhile."""
        done = 0
        watcher = asyncio.create_task(_cancel_on_disconnect(call, http))
        try:
            while done < len(call.rows):
                event = await call.events.get()
                if event[0] == "disconnected":
                    return {}
                if event[0] == "error":
                    raise APIError(500, event[1], type="server_error")
                done += event[0] == "done"
        finally:
            watcher.cancel()
            if done < len(call.rows):
                call.cancel()
        return await self._encode(shape.full, call.rows)  # log-probs decode a token at a time: off the loop

    async def _stream(self, call: "_Call", shape: "_Shape", include_usage: bool) -> AsyncIterator[str]:
        """SSE events; the client going away cancels this generator (Starlette), and with it the generation."""
        done = 0
        try:
            for i in range(len(call.rows)):
                yield _data(shape.chunk(i, start=True))
            while done < len(call.rows):
                event = await call.events.get()
                if event[0] == "error":
                    yield _data(APIError(500, event[1], type="server_error").response().body.decode(), raw=True)
                    return
                if event[0] == "text":
                    yield _data(shape.chunk(event[1], text=event[2]))
                else:
                    done += 1
                    yield _data(shape.chunk(event[1], finish_reason=event[2]))
            if include_usage:
                yield _data(shape.usage_chunk(call.rows))
            yield "data: [DONE]\n\n"
        finally:
            if done < len(call.rows):
                call.cancel()


@dataclasses.dataclass
class _Call:
    """One API request: a scheduler request per prompt, sharing one event queue and one cancel flag; its rows in
    choice order."""

    requests: list[Request]
    rows: list[Row]
    events: asyncio.Queue

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()


async def _cancel_on_disconnect(call: _Call, http: HTTPRequest) -> None:
    """Cancel ``call`` when its client hangs up. A non-streaming answer writes nothing until it is complete, so
    no failed write would tell: ask the server, on a clock (not between events, which keep coming while the
    generation runs)."""
    while not await http.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    call.cancel()
    call.events.put_nowait(("disconnected",))  # also ends the wait of a request cancelled before it ran


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(obj: Any, raw: bool = False) -> str:
    return f"data: {obj if raw else json.dumps(obj)}\n\n"


class _Shape:
    """The response objects of one endpoint (chat or text completion)."""

    prefix = ""

    def __init__(self, model: str, prompts: list[list[int]], tokenizer: Any):
        self.model, self.prompt_tokens, self.tokenizer = model, sum(len(p) for p in prompts), tokenizer
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())

    def usage(self, rows: list[Row]) -> dict[str, int]:
        completion = sum(len(r.tokens) for r in rows)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def piece(self, token: int) -> str:
        """A token's text, as OpenAI and vLLM show it in log-probs (special tokens too)."""
        return self.tokenizer.decode([token])

    def full(self, rows: list[Row]) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, start: bool = False):
        raise NotImplementedError

    def usage_chunk(self, rows: list[Row]) -> dict[str, Any]:
        raise NotImplementedError


class _Chat(_Shape):
    prefix = "chatcmpl"

    def __init__(self, model: str, prompts: list[list[int]], tokenizer: Any, top_logprobs: int | None):
        super().__init__(model, prompts, tokenizer)
        self.top_logprobs = top_logprobs  # None: no logprobs asked

    def full(self, rows: list[Row]) -> dict[str, Any]:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": self.logprobs(r)} for i, r in enumerate(rows)]
        return {**self.head("chat.completion"), "choices": choices, "usage": self.usage(rows)}

    def logprobs(self, row: Row) -> dict[str, Any] | None:
        """OpenAI's chat ``logprobs``: every completion token with its log-prob and ``top_logprobs`` alternatives."""
        if self.top_logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.piece(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                   for t in row.completion_logprobs]
        return {"content": content, "refusal": None}

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, start: bool = False):
        delta = {"role": "assistant", "content": ""} if start else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self.head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, rows: list[Row]) -> dict[str, Any]:
        return {**self.head("chat.completion.chunk"), "choices": [], "usage": self.usage(rows)}


class _Completion(_Shape):
    prefix = "cmpl"

    def __init__(self, model: str, prompts: list[list[int]], tokenizer: Any, logprobs: int | None, echo: bool,
                 texts: list[str] | None, n: int):
        super().__init__(model, prompts, tokenizer)
        self.prompts, self.logprobs, self.echo, self.texts, self.n = prompts, logprobs, echo, texts, n

    def echoed(self, prompt: int) -> str:
        """OpenAI echoes a text prompt as sent, token ids as they decode."""
        if not self.echo:
            return ""
        return self.texts[prompt] if self.texts is not None else self.tokenizer.decode(self.prompts[prompt])

    def full(self, rows: list[Row]) -> dict[str, Any]:
        choices = []
        for i, row in enumerate(rows):
            echo = self.echoed(i // self.n)
            choices.append({"index": i, "text": echo + row.text, "finish_reason": row.finish_reason,
                            "logprobs": self.choice_logprobs(row)})
        return {**self.head("text_completion"), "choices": choices, "usage": self.usage(rows)}

    def choice_logprobs(self, row: Row) -> dict[str, Any] | None:
        """OpenAI's legacy completions ``logprobs``: the echoed prompt's tokens (the first has no log-prob: nothing
        predicts it) then the completion's, each with its ``logprobs`` likeliest alternatives and itself."""
        if self.logprobs is None:
            return None
        scored: list[TokenLogprob | None] = list(row.completion_logprobs)
        tokens = [t.token for t in scored]
        if self.echo:
            scored = [None, *row.prompt_token_logprobs, *scored]
            tokens = [*row.prompt, *tokens]
        pieces = [self.piece(t) for t in tokens]
        offsets, at = [], 0
        for piece in pieces:  # vLLM's text_offset: where each token's text starts, pieces laid end to end
            offsets.append(at)
            at += len(piece)
        tops = [None if t is None else self.top_dict([*t.top, (t.token, t.logprob)]) for t in scored]
        return {"tokens": pieces, "token_logprobs": [None if t is None else t.logprob for t in scored],
                "top_logprobs": tops, "text_offset": offsets}

    def top_dict(self, candidates: list[tuple[int, float]]) -> dict[str, float]:
        """Text -> log-prob. Tokens that decode alike (byte pieces of one character) share a key: it keeps the
        likeliest, so a token is the argmax exactly when its log-prob is the largest value (lm-eval's is_greedy)."""
        top: dict[str, float] = {}
        for token, logprob in candidates:
            piece = self.piece(token)
            top[piece] = max(logprob, top.get(piece, -math.inf))
        return top

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, start: bool = False):
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self.head("text_completion"), "choices": [choice]}

    def usage_chunk(self, rows: list[Row]) -> dict[str, Any]:
        return {**self.head("text_completion"), "choices": [], "usage": self.usage(rows)}


__all__ = ["APIError", "context_length", "create_app"]
