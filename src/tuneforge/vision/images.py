"""Image parts of a record opened with Pillow: a path (relative to the data file), a base64 string or a data URL.

Every image of a record is opened and decoded when the record is encoded, before the first training step, so a
missing or corrupt file is one line naming the record and the image (``data.jsonl:7: image 2: ...``), not a crash
an hour in. Remote URLs are refused: training and serving never reach the network on a record's say-so.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from ..data.formats import DataError, Example

DATA_URL_PREFIX = "data:"


class ImageError(ValueError):
    """Why one image cannot be used (the caller adds which record and which image)."""


def decode_base64(text: str) -> bytes:
    """The bytes of a base64 string or of a ``data:image/...;base64,`` URL."""
    if text.startswith(DATA_URL_PREFIX):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ImageError("a data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"not valid base64 ({e})") from None


def image_bytes(part: dict[str, str], max_bytes: int | None = None) -> bytes:
    """The encoded image a part points at. ``max_bytes`` bounds what is read (a server's request limit)."""
    if "path" in part:
        path = Path(part["path"])
        if not path.is_file():
            raise ImageError(f"file not found: {path}")
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise ImageError(f"{path} is {path.stat().st_size:,} bytes, over the limit of {max_bytes:,}")
        return path.read_bytes()
    text = part.get("base64") or part.get("url") or ""
    if "url" in part and not text.startswith(DATA_URL_PREFIX):
        raise ImageError(f"remote image URLs are not fetched ({text[:60]}); download the image and give its path, "
                         "or send it as a data: URL")
    if max_bytes is not None and len(text) * 3 // 4 > max_bytes:
        raise ImageError(f"the image is about {len(text) * 3 // 4:,} bytes, over the limit of {max_bytes:,}")
    return decode_base64(text)


def open_image(data: bytes, max_pixels: int | None = None) -> Any:
    """The decoded RGB image; over ``max_pixels`` (width x height) is refused before the pixels are decoded."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        pixels = image.width * image.height
        if max_pixels is not None and pixels > max_pixels:
            raise ImageError(f"{image.width}x{image.height} = {pixels:,} pixels, over --max-image-pixels "
                             f"{max_pixels:,}")
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError; truncated files too
        raise ImageError(f"cannot read the image ({' '.join(str(e).split()) or type(e).__name__})") from None
    return image.convert("RGB")


def load_part(part: dict[str, str], max_pixels: int | None = None, max_bytes: int | None = None) -> Any:
    return open_image(image_bytes(part, max_bytes), max_pixels)


def load_images(example: Example, messages: list[dict[str, Any]] | None = None, max_pixels: int | None = None
                ) -> list[Any]:
    """The images of ``messages`` (default: the example's), in reading order, each checked; an error names the
    record and the image's 1-based number."""
    parts = [p for m in (example.messages if messages is None else messages) if isinstance(m["content"], list)
             for p in m["content"] if p["type"] == "image"]
    images = []
    for n, part in enumerate(parts, start=1):
        try:
            images.append(load_part(part, max_pixels))
        except ImageError as e:
            raise DataError(f"{example.source}: image {n}: {e}") from None
    return images
