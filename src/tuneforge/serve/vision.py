"""Chat requests with images: OpenAI's ``image_url`` content parts, answered by a vision-language model.

An image comes as a ``data:image/...;base64,`` URL inside the request (bounded by the server's body limit and by
``--max-image-pixels``); remote URLs are refused, since the server would otherwise fetch whatever a client names.
The answer is computed by ``vision.generate.generate_chat``, the function ``tuneforge generate --image`` calls, with
the request's adapter activated as for text batches (under the registry's lock, between them): the same prompt
and image give the same greedy answer from both.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from ..vision.generate import generate_chat
from ..vision.images import ImageError, load_part
from ..vision.processor import VisionProcessor
from .registry import SHARED, AdapterRegistry

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # what a request may make the server decode, unless --max-image-pixels says


class ImageRequestError(ValueError):
    """Why a request's images cannot be answered (the app turns it into a 400 naming ``messages``)."""


def has_images(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"]) for m in messages)


def checked_messages(messages: list[dict[str, Any]], processor: Any) -> list[dict[str, Any]]:
    """The request's messages with every image decoded once to check it (format, size), before any queueing."""
    if not isinstance(processor, VisionProcessor):
        raise ImageRequestError("image_url parts need a vision-language model; this server's model is text-only")
    limit = processor.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
    n = 0
    for i, message in enumerate(messages):
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] != "image":
                continue
            n += 1
            try:
                load_part(part, limit)
            except ImageError as e:
                raise ImageRequestError(f"messages[{i}]: image {n}: {e}") from None
    return messages


def answer(registry: AdapterRegistry, adapter, messages: list[dict[str, Any]], *, max_tokens: int,
           temperature: float, top_p: float, top_k: int, seed: int | None, model_name: str) -> dict[str, Any]:
    """A ``chat.completion`` for one conversation with images (greedy at temperature 0, as ``generate``)."""
    group, name = (adapter.group, adapter.name) if adapter is not None else (SHARED, None)
    with registry.activate(group, [name]):
        text = generate_chat(registry.model, registry.tokenizer, [messages], max_new_tokens=max_tokens,
                             do_sample=temperature > 0, temperature=temperature, top_p=top_p, top_k=top_k,
                             batch_size=1, seed=seed)[0]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": None}]}
