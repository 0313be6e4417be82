"""tuneforge: fine-tune causal language models with every method and objective, natively on PyTorch.

    import tuneforge as tf
    model, tok = tf.load_model("smollm2-135m-instruct")
    handle = tf.attach(model, tf.LoRAConfig(r=16, target_modules="all-linear"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Where each public name lives. Importing ``tuneforge`` (which every ``tuneforge.X`` import does first) must not load
# torch: ``tuneforge --help`` would take seconds. A name's module is imported the first time the name is used.
_PUBLIC = {
    "RunConfig": "config", "load_config": "config",
    "evaluate": "inference.evaluate", "exact_match": "inference.evaluate", "perplexity": "inference.evaluate",
    "generate": "inference.generate",
    "load_for_inference": "inference.loading",
    "attach": "methods", "available_methods": "methods", "get_method": "methods", "load_adapter": "methods",
    "AdaLoRAConfig": "methods.adalora", "AdapterConfig": "methods.adapter", "FullConfig": "methods.full",
    "LoRAConfig": "methods.lora", "PTuningConfig": "methods.p_tuning", "PTuningV2Config": "methods.p_tuning_v2",
    "PrefixTuningConfig": "methods.prefix_tuning", "PromptTuningConfig": "methods.prompt_tuning",
    "QLoRAConfig": "methods.qlora",
    "load_model": "models.loading",
    "train": "run.trainer",
}

# Written out (not list(_PUBLIC)) so that linters see the imports below as the public API.
__all__ = ["RunConfig", "load_config", "evaluate", "exact_match", "perplexity", "generate", "attach",
           "available_methods", "get_method", "load_adapter", "load_for_inference", "load_model", "train",
           "FullConfig", "LoRAConfig", "QLoRAConfig", "AdaLoRAConfig", "AdapterConfig", "PromptTuningConfig",
           "PTuningConfig", "PrefixTuningConfig", "PTuningV2Config"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tuneforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:  # what type checkers and IDEs see: the eager imports this module defers
    from .config import RunConfig, load_config
    from .inference.evaluate import evaluate, exact_match, perplexity
    from .inference.generate import generate
    from .inference.loading import load_for_inference
    from .methods import attach, available_methods, get_method, load_adapter
    from .methods.adalora import AdaLoRAConfig
    from .methods.adapter import AdapterConfig
    from .methods.full import FullConfig
    from .methods.lora import LoRAConfig
    from .methods.p_tuning import PTuningConfig
    from .methods.p_tuning_v2 import PTuningV2Config
    from .methods.prefix_tuning import PrefixTuningConfig
    from .methods.prompt_tuning import PromptTuningConfig
    from .methods.qlora import QLoRAConfig
    from .models.loading import load_model
    from .run.trainer import train
