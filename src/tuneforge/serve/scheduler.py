"""A bounded queue of generation requests and the one worker thread that batches them onto the model.

Requests wait in arrival order; at most ``max_queue`` wait at once (``submit`` raises :class:`QueueFull`, the app
answers 429; an API request with several prompts is one request per prompt, queued together or not at all), so
memory stays bounded whatever the load: one running batch of at most ``max_batch_size`` rows plus the waiting
prompts. The worker takes the oldest request and every later one of the same batch group (the base and
all LoRA adapters are one group; every other adapter is its own, see ``registry.py``) until the batch is full, and
runs them together. A batch runs to its end before the next starts (static batching: the KV cache of a
transformers model does not take new rows mid-generation). A request whose client is gone is marked cancelled; its
rows stop at the next token, and it is skipped if still waiting.

Results go back to the asyncio side through ``loop.call_soon_threadsafe``: the event-loop thread never runs the
model, and the worker never touches asyncio objects directly.

``stop`` cancels every request still waiting or running (the running batch ends at its next token), so shutting the
server down takes seconds, whatever the generations in flight had left to do.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from typing import Any

from ..inference.generate import stop_token_ids
from .engine import Row, run_batch
from .registry import SHARED, AdapterRegistry

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Raised by ``submit`` when ``max_queue`` requests already wait."""


@dataclasses.dataclass
class Request:
    """``n`` choices of one prompt for one adapter (None: the base). The requests of one API call with several
    prompts share ``events`` and ``cancelled``; ``first`` is the API choice index of this request's first row."""

    adapter: str | None
    group: str
    rows: list[Row]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    """Receives ("text", choice, piece), ("done", choice, finish_reason) and ("error", message) tuples."""
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    first: int = 0

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, *event: Any) -> None:
        if not self.loop.is_closed():  # at shutdown the client's loop may be gone: nobody is left to tell
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    def __init__(self, registry: AdapterRegistry, max_queue: int = 64, max_batch_size: int = 8):
        if max_queue < 1 or max_batch_size < 1:
            raise ValueError(f"max_queue ({max_queue}) and max_batch_size ({max_batch_size}) must be at least 1")
        self.registry = registry
        self.max_queue, self.max_batch_size = max_queue, max_batch_size
        tokenizer = registry.tokenizer
        self.stop_ids = stop_token_ids(tokenizer, registry.model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._running = threading.Event()
        self._running.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._current: list[Request] = []  # the running batch's requests, for stop() to cancel
        self.batches_run = 0
        self.requests_cancelled = 0  # requests whose client left before their generation ended

    # -- control -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="tuneforge-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every waiting and running request and wait (at most ``timeout`` s) for the worker to end."""
        with self._wake:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._wake.notify_all()
        for request in [*waiting, *self._current]:
            request.cancel()
        for request in waiting:
            request.send("error", "the server is shutting down")
        self._running.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        """Finish the running batch, then start no other until ``resume`` (requests keep queueing)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        with self._wake:
            self._wake.notify_all()

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, *requests: Request) -> None:
        """Queue ``requests`` (an API call's prompts) together: all of them, or none (QueueFull / ValueError)."""
        for request in requests:
            if len(request.rows) > self.max_batch_size:
                raise ValueError(f"n={len(request.rows)} choices exceed the server's --max-batch-size "
                                 f"{self.max_batch_size}")
        if len(requests) > self.max_queue:
            raise ValueError(f"{len(requests)} prompts exceed the server's --max-queue {self.max_queue}")
        with self._wake:
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} of {self.max_queue} requests are already waiting; retry "
                                "later")
            self._waiting.extend(requests)
            self._wake.notify()

    def queued(self) -> int:
        return len(self._waiting)

    # -- worker ------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            self._running.wait()
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[Request] | None:
        """The oldest request and same-group followers that fit the batch; None when stopping."""
        with self._wake:
            while not self._waiting and not self._stopping:
                self._wake.wait(timeout=1.0)
            if self._stopping:
                return None
            if not self._running.is_set():
                return []
            first = self._waiting[0]
            batch, size = [], 0
            for request in list(self._waiting):
                if request.cancelled.is_set():
                    self._waiting.remove(request)
                    self.requests_cancelled += 1
                    continue
                if request.group != first.group or size + len(request.rows) > self.max_batch_size:
                    continue
                self._waiting.remove(request)
                batch.append(request)
                size += len(request.rows)
            return batch

    def _run(self, batch: list[Request]) -> None:
        with self.registry.lock:  # held through the batch: no adapter is added or removed under it
            batch = [request for request in batch if self._still_served(request)]
            self._current = batch
            if self._stopping:  # stop() ran between taking the batch and here
                for request in batch:
                    request.cancel()
            try:
                if batch:
                    self._generate(batch)
            finally:
                self._current = []

    def _still_served(self, request: Request) -> bool:
        """False (and the client told so) when the request's adapter was removed while it waited."""
        if request.adapter is None or request.adapter in self.registry.adapters:
            return True
        request.send("error", f"adapter {request.adapter!r} was removed before this request ran")
        return False

    def _generate(self, batch: list[Request]) -> None:
        rows = [row for request in batch for row in request.rows]
        row_adapters = [request.adapter for request in batch for _ in request.rows]
        group = batch[0].group
        try:
            with self.registry.activate(group, row_adapters if group == SHARED else [None] * len(rows)):
                run_batch(self.registry.model, self.registry.tokenizer, rows, self.stop_ids, self.pad_id)
        except Exception as e:  # one bad batch must not kill the worker; its clients get a 500
            log.exception("generation failed")
            for request in batch:
                request.send("error", f"generation failed: {type(e).__name__}: {e}")
            return
        finally:
            self.batches_run += 1
        for request in batch:
            self.requests_cancelled += request.cancelled.is_set()
            for i, row in enumerate(request.rows):
                request.send("done", request.first + i, row.finish_reason)


__all__ = ["QueueFull", "Request", "Scheduler"]
