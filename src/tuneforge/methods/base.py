"""The contract every fine-tuning method meets, and the mechanics they share.

A method is registered by name with :func:`register`. ``attach(model, config)`` freezes the base model, injects
the method's modules in place and returns a :class:`MethodHandle`. The handle knows the trainable parameters,
the adapter state dict (PEFT's key names where PEFT has the method), how to save / load it, a ``disabled()``
context in which the model is the untouched base (so DPO / PPO get their reference model for free), and, for
the LoRA family, ``merge()`` / ``unmerge()``.

Callers never see virtual tokens: a prompt method hooks the model so that ``model(input_ids, attention_mask,
position_ids, past_key_values, labels)`` takes and returns tensors over the real tokens only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT prefixes saved keys of LoRA-style methods with the PeftModel's own attribute path.
PEFT_PREFIX = "base_model.model."

_REGISTRY: dict[str, type["Method"]] = {}


@dataclasses.dataclass
class MethodConfig:
    """Base class of every method's config. Subclasses are dataclasses with one documented field per option."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) for method {cls.method!r}: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)


class Method:
    """A fine-tuning method: a name, a config class, and ``attach``."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    aliases: ClassVar[tuple[str, ...]] = ()
    # The peak learning rate used when a run does not set one. Methods differ by orders of magnitude: full
    # fine-tuning moves pretrained weights (~1e-5), soft prompts start from nothing (~1e-2).
    default_learning_rate: ClassVar[float] = 2e-4

    @classmethod
    def attach(cls, model: nn.Module, config: MethodConfig) -> "MethodHandle":
        raise NotImplementedError

    @classmethod
    def model_load_kwargs(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments for ``models.load_model`` (QLoRA returns a 4-bit quantization_config)."""
        return {}

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> "MethodHandle":
        """Attach with the config saved in ``adapter_dir`` and load its weights."""
        raise NotImplementedError


def register(method_cls: type[Method]) -> type[Method]:
    for name in (method_cls.name, *method_cls.aliases):
        _REGISTRY[canonical_name(name)] = method_cls
    return method_cls


def canonical_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def get_method(name: str) -> type[Method]:
    from . import _load_all  # noqa: F401  (importing the package registers every method)

    key = canonical_name(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[key]


def available_methods() -> list[str]:
    from . import _load_all  # noqa: F401

    return sorted({cls.name for cls in _REGISTRY.values()})


class MethodHandle:
    """What ``attach`` returns. Subclasses override what differs; the defaults suit most methods."""

    def __init__(self, model: nn.Module, config: MethodConfig):
        self.model = model
        self.config = config

    # -- parameters ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    def num_total_parameters(self) -> int:
        return count_parameters(self.model)

    # -- state --------------------------------------------------------------------------------------
    def _saved_model_keys(self) -> list[str]:
        """The model's own state-dict keys that make up the adapter (methods whose modules mirror PEFT's)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the keys written to ``adapter_model.safetensors``.

        Default: the model's keys from ``_saved_model_keys`` behind PEFT's ``base_model.model.`` prefix.
        """
        own = self.model.state_dict()
        return {PEFT_PREFIX + k: own[k] for k in self._saved_model_keys()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into the model; every key and shape must match (nothing is silently skipped)."""
        expected = {PEFT_PREFIX + k: k for k in self._saved_model_keys()}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"adapter weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        tensors = dict(self.model.named_parameters())
        tensors.update(dict(self.model.named_buffers()))
        with torch.no_grad():
            for saved, own in expected.items():
                target = tensors[own]
                if target.shape != state[saved].shape:
                    raise ValueError(f"{saved}: saved shape {tuple(state[saved].shape)} != model {tuple(target.shape)}")
                target.copy_(state[saved])

    def adapter_config(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content (PEFT's fields where PEFT has the method)."""
        raise NotImplementedError

    def save(self, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
        from ..checkpoint import save_adapter

        return save_adapter(self, directory, base_model_name_or_path)

    # -- switches -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside this context the model computes exactly what the base model computes."""
        modules = [m for m in self.model.modules() if isinstance(m, Switchable)]
        previous = [m.adapter_enabled for m in modules]
        for m in modules:
            m.adapter_enabled = False
        try:
            yield
        finally:
            for m, p in zip(modules, previous):
                m.adapter_enabled = p

    def merge(self) -> None:
        raise NotImplementedError(f"{type(self.config).method} cannot be merged into the base weights")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self.config).method} cannot be merged into the base weights")

    # -- training hooks (no-ops unless a method needs them) -----------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser added to the objective's loss each micro-batch (AdaLoRA's orthogonality term)."""
        return None

    def after_backward(self, step: int) -> None:
        """Called once per optimiser step, after gradients are accumulated and before ``optimizer.step``."""

    def after_step(self, step: int) -> None:
        """Called once per optimiser step, after ``optimizer.step`` (AdaLoRA's rank budget lives here)."""

    def summary(self) -> dict[str, Any]:
        """Facts worth printing at the end of a run (e.g. AdaLoRA's final ranks)."""
        return {}

    def training_state(self) -> dict[str, torch.Tensor]:
        """Method state that is not a parameter but must survive a resume (AdaLoRA's importance averages)."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``training_state`` returned."""


class Switchable:
    """Mixin for injected modules: ``adapter_enabled = False`` makes the module compute the base output."""

    adapter_enabled: bool = True


# -- shared mechanics -------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once (tied embeddings once); 4-bit packed weights counted by their real element count."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        # bitsandbytes packs 4-bit values into the storage dtype (two per byte); PEFT counts 2 x element size.
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
    return total


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def linear_like(module: nn.Module) -> bool:
    """True for layers LoRA-style methods can wrap: nn.Linear, bnb 4/8-bit Linear, GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ in {"Conv1D", "Linear4bit", "Linear8bitLt"}


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if type(module).__name__ == "Conv1D":  # GPT-2 stores weight as [in, out]
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def output_embedding_names(model: nn.Module) -> set[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules() if out is not None and m is out}


def find_target_modules(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the modules to wrap.

    ``"all-linear"`` means every linear layer except the output head (as PEFT). A list matches a module when
    its name equals an entry or ends with ``.<entry>`` (PEFT's rule); a single string other than
    ``all-linear`` is a regular expression that must match the full name.
    """
    skip = output_embedding_names(model)
    names = []
    for name, module in model.named_modules():
        if not name or name in skip or not linear_like(module):
            continue
        if target_modules == "all-linear":
            names.append(name)
        elif isinstance(target_modules, str):
            if re.fullmatch(target_modules, name):
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matched no linear layer; layer names look like: "
            + ", ".join(sorted({n.split('.')[-1] for n, m in model.named_modules() if linear_like(m)})[:12])
        )
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_modules(model: nn.Module, names: list[str], make: Callable[[str, nn.Module], nn.Module]) -> None:
    """Replace each named module by ``make(name, module)``; the wrapper keeps the original as ``base_layer``."""
    for name in names:
        replace_module(model, name, make(name, model.get_submodule(name)))


def short_target_names(names: list[str]) -> list[str]:
    """The distinct last components (``q_proj``, ``c_attn``): what PEFT's ``target_modules`` list holds."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def write_json(path: Path, data: dict[str, Any]) -> None:
    # PEFT writes indented, sorted JSON with sets as lists.
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_dims(model: nn.Module) -> dict[str, int]:
    """Hidden size, layers, heads and KV heads under the names configs in transformers use."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", cfg)
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
