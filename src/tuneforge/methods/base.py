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
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..options import Options
from ..registry import Registry
# Adapter files (names, save / read) live in adapter_files.py; the file names stay importable from here.
from .adapter_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME  # noqa: F401

# PEFT prefixes saved keys of LoRA-style methods with the PeftModel's own attribute path.
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class MethodConfig(Options):
    """Base class of every method's config. Subclasses are dataclasses with one documented field per option."""

    kind: ClassVar[str] = "method"
    method: ClassVar[str] = ""  # the registered method's name, set when it registers (registry.py)

    @classmethod
    def owner_name(cls) -> str:
        return cls.method

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Called by the trainer with the run's tokenizer before ``attach`` (prompt tuning's TEXT init reads it)."""


class Method:
    """A fine-tuning method: a name, a config class, and ``attach``."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    aliases: ClassVar[tuple[str, ...]] = ()
    flag_prefix: ClassVar[str] = ""
    """Prefix of the method's options on the command line (``--lora-r 16``); default: the name."""
    trains_base_weights: ClassVar[bool] = False
    """The method changes the base weights themselves (full fine-tuning): there is no adapter to switch off, so a
    reference model (DPO, PPO) is a frozen copy, the weights keep the model's dtype, and the run saves the
    tokenizer beside the model."""
    packing_refusal: ClassVar[str | None] = None
    """Why batches that pack several examples into one row (``data.packing``) would be wrong for this method;
    None: packed batches give exactly the padded batches' losses and gradients."""
    peft_type: ClassVar[str | None] = None
    """PEFT's ``peft_type`` for this method's files (None: PEFT has no such method, or another class reads them)."""
    quantized_base: ClassVar[bool] = False
    """The frozen base's linear layers are held in 4 bits (QLoRA): ~0.5 byte per weight instead of 2, and every
    matmul de-quantises a block first (slower). Memory and time estimates (``choose/recommend.py``) read it."""
    # The peak learning rate used when a run does not set one. Methods differ by orders of magnitude: full
    # fine-tuning moves pretrained weights (~1e-5), soft prompts start from nothing (~1e-2).
    default_learning_rate: ClassVar[float] = 2e-4

    @classmethod
    def attach(cls, model: nn.Module, config: MethodConfig) -> "MethodHandle":
        raise NotImplementedError

    @classmethod
    def float_base_method(cls) -> type["Method"]:
        """The method that trains the same tensors over a float base: itself, or for a quantised base (QLoRA) the
        adapter it puts on it (LoRA). A model built on the meta device to count parameters cannot be quantised."""
        return cls

    @classmethod
    def model_load_kwargs(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments for ``models.load_model`` (QLoRA returns a 4-bit quantization_config)."""
        return {}

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> "MethodHandle":
        """Attach with the config saved in ``adapter_dir`` (tuneforge's or PEFT's files) and load its weights.

        The one loading template: a method says how its config is read back (``config_from_saved``) and, where it
        differs from training, how it attaches for saved weights (``attach_saved``)."""
        from .adapter_files import read_adapter_config, read_adapter_weights, read_tuneforge_meta

        saved = read_adapter_config(adapter_dir)
        options = (read_tuneforge_meta(adapter_dir) or {}).get("options", {})
        handle = cls.attach_saved(model, cls.config_from_saved(saved, options, model), saved)
        handle.load_state_dict(read_adapter_weights(adapter_dir))
        return handle

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module) -> MethodConfig:
        """The config an adapter was saved with: ``saved`` is its ``adapter_config.json`` (PEFT's fields),
        ``options`` tuneforge's own record of the options (empty for PEFT's files)."""
        raise NotImplementedError(f"{cls.name} adapters cannot be loaded")

    @classmethod
    def attach_saved(cls, model: nn.Module, config: MethodConfig, saved: dict[str, Any]) -> "MethodHandle":
        """Attach before saved weights are copied in (default: ``attach``; a prompt skips its initialisation)."""
        return cls.attach(model, config)


METHODS: Registry[Method] = Registry("method", "tuneforge.methods")
register = METHODS.register
get_method = METHODS.get
available_methods = METHODS.names


class MethodHandle:
    """What ``attach`` returns. Subclasses override what differs; the defaults suit most methods."""

    def __init__(self, model: nn.Module, config: MethodConfig):
        self.model = model
        self.config = config

    # -- parameters ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def float32_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable tensors that train in float32 over a bf16 / fp16 base (PEFT's autocast_adapter_dtype):
        those whose layers cast their input (adapters). Default: every trainable tensor."""
        return self.trainable_parameters()

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
        from .adapter_files import save_adapter

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
        """Fold the update into the base weights in place (the modules stay, so ``unmerge`` can undo it)."""
        raise NotImplementedError(self._not_mergeable())

    def unmerge(self) -> None:
        raise NotImplementedError(self._not_mergeable())

    def merge_and_unload(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        """Fold the update into the base weights and return a plain Hugging Face model in ``dtype`` (default: the
        model's own). ``tuneforge merge`` calls this; the handle is spent afterwards. Only the LoRA family (and
        full fine-tuning, which has nothing to fold) can."""
        raise ValueError(self._not_mergeable())

    def remove(self) -> nn.Module:
        """Take the method's modules and hooks off without merging: the model is the plain base model again."""
        raise NotImplementedError(f"{type(self.config).method} cannot be removed from the model in place")

    def _not_mergeable(self) -> str:
        return (f"a {type(self.config).method!r} adapter cannot be merged into the base weights (only the LoRA "
                "family can); load it with --adapter instead")

    # -- training hooks (no-ops unless a method needs them) -----------------------------------------
    def begin_training(self, total_steps: int) -> None:
        """Called once before the first step with the run's length (AdaLoRA's rank schedule needs it)."""

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


def cast_model(model: nn.Module, dtype: torch.dtype | str | None) -> nn.Module:
    """``model`` in ``dtype`` (a torch dtype or its name); unchanged when None."""
    if dtype is None:
        return model
    return model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)


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


def check_rank(model: nn.Module, names: list[str], rank: int, option: str = "r") -> None:
    """Refuse a rank above every target layer's smaller dimension before allocating anything: such factors add
    parameters but no rank, and a slip such as r=1e9 would otherwise try to allocate hundreds of gigabytes."""
    limit = max(min(in_out_features(model.get_submodule(name))) for name in names)
    if rank > limit:
        raise ValueError(f"{option}={rank} exceeds the smaller dimension of every target layer (at most {limit}); "
                         f"a rank above {limit} cannot add rank")


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
