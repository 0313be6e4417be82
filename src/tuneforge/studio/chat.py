"""The Chat tab's engine: ``tuneforge serve``'s, in process. One base model is loaded; trained adapters are added to
its :class:`~tuneforge.serve.registry.AdapterRegistry` by run folder, and a prompt goes to the base and to an adapter
as two requests of one :class:`~tuneforge.serve.scheduler.Scheduler` (LoRA rows share one batch). Greedy rows give
what ``tuneforge generate`` gives for the same prompt (serve's engine makes the same calls)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import AsyncIterator, Callable

from ..data.template import ensure_chat_template, prompt_ids
from ..serve.engine import Row
from ..serve.registry import SHARED, AdapterRegistry
from ..serve.scheduler import Request, Scheduler


class ChatEngine:
    def __init__(self, device: str | None = None):
        self.device = device
        self.registry: AdapterRegistry | None = None
        self.scheduler: Scheduler | None = None
        self._paths: dict[str, str] = {}  # adapter name -> run folder
        self._lock = threading.Lock()

    def use(self, base: str) -> AdapterRegistry:
        """The registry over ``base``, loading it (and dropping the previous base) when it is another model."""
        from ..inference.loading import load_for_inference
        from ..models.loading import model_fingerprint

        with self._lock:
            if self.registry is not None and self.registry.base_name == base:
                return self.registry
            self.close()
            model, tokenizer, _ = load_for_inference(base, None, device=self.device)
            ensure_chat_template(tokenizer)
            self.registry = AdapterRegistry(model, tokenizer, base, model_fingerprint(base))
            self.scheduler = Scheduler(self.registry)
            self.scheduler.start()
            self._paths = {}
            return self.registry

    def adapter(self, run: Path, name: str) -> str:
        """``run``'s adapter served under ``name`` (added once; added again when the folder was retrained)."""
        registry = self.registry
        assert registry is not None, "use() a base first"
        stamp = f"{run}@{_mtime(run)}"
        if self._paths.get(name) != stamp:
            if name in registry.adapters:
                registry.remove(name)
            registry.add(name, run)
            self._paths[name] = stamp
        return name

    async def side_by_side(self, conversations: list[list[dict[str, str]]], adapters: list[str | None],
                           max_new_tokens: int, temperature: float = 0.0,
                           seed: int | None = 0) -> AsyncIterator[list[str]]:
        """Each conversation answered by its adapter (None: the base), all queued together; the texts so far after
        every piece any of them decodes."""
        registry, scheduler = self.registry, self.scheduler
        assert registry is not None and scheduler is not None, "use() a base first"
        loop, events = asyncio.get_running_loop(), asyncio.Queue[tuple]()
        requests = []
        for choice, (messages, name) in enumerate(zip(conversations, adapters)):
            group = SHARED if name is None else registry.adapters[name].group
            request = Request(name, group, [], loop, events, first=choice)
            request.rows.append(Row(prompt_ids(registry.tokenizer, messages), max_new_tokens, temperature,
                                    seed=seed, emit=_sender(request, choice)))
            requests.append(request)
        scheduler.submit(*requests)
        texts, done = ["" for _ in requests], 0
        try:
            while done < len(requests):
                event = await events.get()
                if event[0] == "error":
                    raise RuntimeError(event[1])
                if event[0] == "text":
                    texts[event[1]] += event[2]
                if event[0] == "done":  # the row's whole decode: pieces streamed before a split character settled
                    texts[event[1]] = requests[event[1]].rows[0].text  # may differ from it in their sum
                    done += 1
                yield list(texts)
        finally:
            for request in requests:
                request.cancel()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        self.registry = self.scheduler = None


def _sender(request: Request, choice: int) -> Callable[[str], None]:
    """A row's ``emit``: its pieces of text go to the request's events under its choice index."""
    return lambda piece: request.send("text", choice, piece)


def _mtime(run: Path) -> float:
    files = [p for p in run.glob("adapter_model.*")]
    return max((p.stat().st_mtime for p in files), default=0.0)
