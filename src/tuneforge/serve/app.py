"""The OpenAI-compatible HTTP API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (SSE streaming or
not), and ``/v1/admin/adapters`` to add and remove adapters at runtime.

A request's ``model`` names an adapter or the base. Errors carry OpenAI's body, ``{"error": {"message", "type",
"param", "code"}}``, so the official clients raise their usual exceptions: 400 for a malformed or out-of-range
request (and a prompt that does not fit the context), 401 without the right bearer token when the server has an API
key, 404 for an unknown model, 429 when the queue is full, 500 when generation fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from ..data.template import ensure_chat_template, prompt_ids
from .engine import Row
from .registry import SHARED, AdapterRegistry
from .scheduler import QueueFull, Request, Scheduler

log = logging.getLogger(__name__)

MAX_CHOICES = 16  # n: more choices than this is a mistake, not a use
MAX_STOP = 4  # OpenAI's limit on stop sequences
# Options a client may send that tuneforge does not implement: refused when set to anything but their default,
# rather than silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "functions", "function_call",
               "response_format", "presence_penalty", "frequency_penalty", "echo", "suffix")


class APIError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- request bodies ----------------------------------------------------------------------------------


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in UNSUPPORTED:
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
        return bool((self.stream_options or {}).get("include_usage"))


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
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | list[int] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


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
               api_key: str | None = None, max_queue: int = 64, max_batch_size: int = 8) -> FastAPI:
    """An app serving ``model`` (under ``base_name``) and ``adapters`` (name -> directory) over it. The scheduler's
    worker starts and stops with the app (its lifespan); ``app.state.scheduler`` / ``.registry`` expose them."""
    ensure_chat_template(tokenizer)
    model.eval()
    registry = AdapterRegistry(model, tokenizer, base_name)
    for name, path in (adapters or {}).items():
        registry.add(name, path)
    scheduler = Scheduler(registry, max_queue=max_queue, max_batch_size=max_batch_size)
    api = _API(registry, scheduler, context_length(model))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="tuneforge serve", lifespan=lifespan)
    app.state.registry, app.state.scheduler = registry, scheduler
    _add_error_handlers(app)
    _add_auth(app, api_key)
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/v1/models")(api.list_models)
    app.get("/v1/models/{name:path}")(api.get_model)
    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/admin/adapters", status_code=201)(api.add_adapter)
    app.delete("/v1/admin/adapters/{name:path}")(api.remove_adapter)
    return app


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
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def crashed(_: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()


def _add_auth(app: FastAPI, api_key: str | None) -> None:
    """With a key, every /v1 route needs ``Authorization: Bearer KEY`` (checked before the body is read)."""
    if not api_key:
        return
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def bearer(request: HTTPRequest, call_next):
        if request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: no key guessing by timing
                what = "Incorrect API key provided" if given else "Missing bearer token (Authorization header)"
                return APIError(401, what, code="invalid_api_key").response()
        return await call_next(request)


class _API:
    def __init__(self, registry: AdapterRegistry, scheduler: Scheduler, context: int):
        self.registry, self.scheduler, self.context = registry, scheduler, context
        self.tokenizer = registry.tokenizer
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
            await run_in_threadpool(self.registry.add, body.name, body.path)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise APIError(400, f"cannot add adapter {body.name!r}: {e}", param="path") from None
        return self._model_card(body.name)

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

    # -- generation ----------------------------------------------------------------------------------
    async def chat(self, body: ChatRequest, http: HTTPRequest):
        adapter = self._resolve(body.model)
        try:
            ids = prompt_ids(self.tokenizer, [m.as_message() for m in body.messages])
        except Exception as e:  # the chat template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template rejects them: {e}", param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        request = self._submit(body, adapter, ids, limit, "messages")
        shape = _Chat(body.model, len(ids))
        if body.stream:
            return _sse(self._stream(request, shape, body.include_usage()))
        return await self._collect(request, shape, http)

    async def completions(self, body: CompletionRequest, http: HTTPRequest):
        adapter = self._resolve(body.model)
        if isinstance(body.prompt, str):
            ids = self.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        else:
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in body.prompt):
                raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", param="prompt")
            ids = list(body.prompt)
        request = self._submit(body, adapter, ids, body.max_tokens, "prompt")
        shape = _Completion(body.model, len(ids))
        if body.stream:
            return _sse(self._stream(request, shape, body.include_usage()))
        return await self._collect(request, shape, http)

    def _submit(self, body: Sampling, adapter, ids: list[int], max_tokens: int | None, param: str) -> Request:
        reserved = adapter.reserved_positions if adapter is not None else 0
        room = self.context - reserved - len(ids)
        if max_tokens is None:
            max_tokens = room  # OpenAI's chat default: whatever the context leaves
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        if max_tokens > room or room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the request needs "
                           f"{len(ids)} prompt + {reserved} virtual + {max_tokens} completion tokens",
                           param=param, code="context_length_exceeded")
        request = Request(adapter.name if adapter else None, adapter.group if adapter else SHARED, [],
                          asyncio.get_running_loop(), asyncio.Queue())
        stops = body.stops()
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i  # n choices: n different draws, each reproducible
            request.rows.append(Row(list(ids), max_tokens, body.temperature, body.top_p, seed, stops,
                                    emit=lambda text, i=i: request.send("text", i, text),
                                    cancelled=request.cancelled.is_set))
        try:
            self.scheduler.submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param="n") from None
        return request

    async def _collect(self, request: Request, shape: "_Shape", http: HTTPRequest) -> dict[str, Any]:
        """Wait for every choice; cancel the generation when the client disconnects meanwhile."""
        done = 0
        try:
            while done < len(request.rows):
                try:
                    event = await asyncio.wait_for(request.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        request.cancel()
                        return {}
                    continue
                if event[0] == "error":
                    raise APIError(500, event[1], type="server_error")
                done += event[0] == "done"
        finally:
            if done < len(request.rows):
                request.cancel()
        return shape.full(request.rows)

    async def _stream(self, request: Request, shape: "_Shape", include_usage: bool) -> AsyncIterator[str]:
        """SSE events; the client going away cancels this generator (Starlette), and with it the generation."""
        done = 0
        try:
            for i in range(len(request.rows)):
                yield _data(shape.chunk(i, start=True))
            while done < len(request.rows):
                event = await request.events.get()
                if event[0] == "error":
                    yield _data(APIError(500, event[1], type="server_error").response().body.decode(), raw=True)
                    return
                if event[0] == "text":
                    yield _data(shape.chunk(event[1], text=event[2]))
                else:
                    done += 1
                    yield _data(shape.chunk(event[1], finish_reason=event[2]))
            if include_usage:
                yield _data(shape.usage_chunk(request.rows))
            yield "data: [DONE]\n\n"
        finally:
            if done < len(request.rows):
                request.cancel()


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(obj: Any, raw: bool = False) -> str:
    return f"data: {obj if raw else json.dumps(obj)}\n\n"


class _Shape:
    """The response objects of one endpoint (chat or text completion)."""

    prefix = ""

    def __init__(self, model: str, prompt_tokens: int):
        self.model, self.prompt_tokens = model, prompt_tokens
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())

    def usage(self, rows: list[Row]) -> dict[str, int]:
        completion = sum(len(r.tokens) for r in rows)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, rows: list[Row]) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, start: bool = False):
        raise NotImplementedError

    def usage_chunk(self, rows: list[Row]) -> dict[str, Any]:
        raise NotImplementedError


class _Chat(_Shape):
    prefix = "chatcmpl"

    def full(self, rows: list[Row]) -> dict[str, Any]:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": None} for i, r in enumerate(rows)]
        return {**self.head("chat.completion"), "choices": choices, "usage": self.usage(rows)}

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, start: bool = False):
        delta = {"role": "assistant", "content": ""} if start else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self.head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, rows: list[Row]) -> dict[str, Any]:
        return {**self.head("chat.completion.chunk"), "choices": [], "usage": self.usage(rows)}


class _Completion(_Shape):
    prefix = "cmpl"

    def full(self, rows: list[Row]) -> dict[str, Any]:
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(rows)]
        return {**self.head("text_completion"), "choices": choices, "usage": self.usage(rows)}

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, start: bool = False):
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self.head("text_completion"), "choices": [choice]}

    def usage_chunk(self, rows: list[Row]) -> dict[str, Any]:
        return {**self.head("text_completion"), "choices": [], "usage": self.usage(rows)}


__all__ = ["APIError", "context_length", "create_app"]
