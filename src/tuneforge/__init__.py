"""tuneforge: fine-tune causal language models with every method and objective, natively on PyTorch.

    import tuneforge as tf
    model, tok = tf.load_model("smollm2-135m-instruct")
    handle = tf.attach(model, tf.LoRAConfig(r=16, target_modules="all-linear"))
"""

from .config import RunConfig, load_config
from .evaluate import evaluate, exact_match, perplexity
from .generate import generate
from .inference import load_for_inference
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
from .models import load_model
from .trainer import train

__version__ = "0.1.0"

__all__ = ["RunConfig", "load_config", "evaluate", "exact_match", "perplexity", "generate", "attach",
           "available_methods", "get_method", "load_adapter", "load_for_inference", "load_model", "train",
           "FullConfig", "LoRAConfig", "QLoRAConfig", "AdaLoRAConfig", "AdapterConfig", "PromptTuningConfig",
           "PTuningConfig", "PrefixTuningConfig", "PTuningV2Config"]
