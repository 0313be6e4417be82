"""tuneforge: fine-tune causal language models with every method and objective, natively on PyTorch.

    import tuneforge as tf
    model, tok = tf.load_model("smollm2-135m-instruct")
    handle = tf.attach(model, tf.LoRAConfig(r=16, target_modules="all-linear"))
"""

from .config import RunConfig, load_config
from .evaluate import evaluate, exact_match, perplexity
from .generate import generate
from .methods import attach, available_methods, get_method, load_adapter
from .methods.full import FullConfig
from .methods.lora import LoRAConfig
from .models import load_model
from .trainer import train

__version__ = "0.1.0"

__all__ = ["RunConfig", "load_config", "evaluate", "exact_match", "perplexity", "generate", "attach",
           "available_methods", "get_method", "load_adapter", "FullConfig", "LoRAConfig", "load_model", "train"]
