"""Load a vision-language model (``AutoModelForImageTextToText``) and its processor from a local folder.

``models.load_model`` hands a folder here when its config.json describes a vision tower (``vision_config``), so
every command that loads a model (train, generate, eval, merge, serve) loads VLMs the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .processor import VisionProcessor, load_processor


def vision_model_type(path: str | Path) -> str | None:
    """The ``model_type`` of a local folder whose config describes a vision-language model, else None."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return config.get("model_type") if isinstance(config, dict) and "vision_config" in config else None


def is_vision_model(model: torch.nn.Module) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def load_vision_model(path: str | Path, model_type: str, kwargs: dict[str, Any], device: torch.device,
                      trust_remote_code: bool = False):
    """``(model, VisionProcessor)``; ``kwargs`` are ``from_pretrained``'s (dtype, attention, quantization)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if "quantization_config" not in kwargs:
        model.to(device)
    processor = VisionProcessor(load_processor(path, model_type, trust_remote_code), model_type)
    return model, processor
