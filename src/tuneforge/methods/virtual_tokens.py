"""Virtual tokens at the input layer: the mechanics Prompt Tuning and P-Tuning share.

Both methods prepend ``N`` trainable embeddings ("virtual tokens") to every sequence's input embeddings and leave
the base model untouched. PEFT does this in ``PeftModelForCausalLM.forward``, so its callers see ``N`` extra
positions; tuneforge hides them instead (see ``methods/base.py``): a forward pre-hook on the causal LM turns the
caller's tensors over the real tokens into tensors over ``[virtual | real]``, and a forward hook strips the
virtual positions from the output. The model keeps its class, signature and ``generate``.

What the pre-hook changes, call by call:

* first call (no cache, or an empty one, under either keyword, ``cache`` or ``past_key_values``: see
  ``kv_cache.py``): ``input_ids`` become ``inputs_embeds`` with the prompt in front; the
  attention mask gets ``N`` ones in front; position ids become ``0..N-1`` for the virtual tokens and the caller's
  positions ``+ N`` for the real ones (without position ids the model numbers ``0..N+T-1`` itself, as in PEFT);
  labels get ``N`` ignored entries, and the first real label is ignored too because, as without virtual tokens,
  nothing predicts it (PEFT lets the last virtual token predict it: losses differ only when ``labels[:, 0]`` is
  supervised); ``logits_to_keep`` is shifted past the virtual positions.
* cached decoding (the cache already holds the virtual tokens): only the attention mask (``N`` ones in front)
  and explicit position ids (``+ N``) change.

Left padding stays correct: the virtual tokens sit before the padding, which the mask hides, and real positions
are counted from ``N``, so a padded row computes what the same row computes alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import ADAPTER_CONFIG_NAME, MethodConfig, MethodHandle, Switchable, model_dims
from .kv_cache import cache_from_kwargs

IGNORE_INDEX = -100
# The attribute of the causal LM that holds the prompt module, so that its parameters train, move and count with
# the model. PEFT keeps its prompt encoder under the same name (on the PeftModel).
PROMPT_MODULE_NAME = "prompt_encoder"


class VirtualTokens(nn.Module, Switchable):
    """Base class of the prompt modules: ``forward()`` returns the ``[num_virtual_tokens, token_dim]`` prompt.

    The hooks on the causal LM are this module's methods, so a deep copy of the model hooks its own copy.
    """

    num_virtual_tokens: int

    def __init__(self):
        super().__init__()
        # Per pending call: (virtual tokens prepended, whether the logits still hold them); a stack, as calls nest.
        self.pending: list[tuple[int, bool]] = []
        self.positional: list[str] = []  # the causal LM's positional parameter names, to read positional args

    def forward(self) -> torch.Tensor:
        raise NotImplementedError

    def before_model(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = {**dict(zip(self.positional, args)), **kwargs}
        if not self.adapter_enabled:
            self.pending.append((0, False))
            return (), kwargs
        if kwargs.get("return_dict") is False:
            raise ValueError("virtual-token methods need return_dict=True outputs to strip the virtual positions")
        # The cache arrives as `cache` from transformers 5.24's generate, as `past_key_values` from older versions
        # or a caller's older code: reading only one name would take every decoding step for a first call.
        if cached_length(cache_from_kwargs(kwargs)[1]) > 0:
            self.pending.append((0, False))
            return (), extend_decoding_inputs(kwargs, self.num_virtual_tokens)
        kwargs = prepend_prompt(model, self, kwargs)
        keep = kwargs.get("logits_to_keep", 0)
        self.pending.append((self.num_virtual_tokens, isinstance(keep, int) and keep == 0))
        return (), kwargs

    def after_model(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        n, logits_hold_virtual = self.pending.pop()
        return strip_outputs(output, n, logits_hold_virtual) if n else output


class PromptEmbedding(VirtualTokens):
    """A table of ``num_virtual_tokens`` free embeddings: Prompt Tuning's parameters, or a loaded (fixed) prompt.

    PEFT names it ``embedding`` in both methods; float32 whatever the base dtype (PEFT keeps prompts in float32),
    cast to the base dtype only where it is prepended.
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, device: torch.device | None = None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        # nn.Embedding's N(0, 1) initialisation is PEFT's RANDOM init.
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device, dtype=torch.float32)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


def install(model: nn.Module, prompt: VirtualTokens) -> list[RemovableHandle]:
    """Register ``prompt`` as ``model.prompt_encoder`` and hook ``model`` so callers never see virtual tokens."""
    if hasattr(model, PROMPT_MODULE_NAME):
        raise ValueError(f"the model already has a {PROMPT_MODULE_NAME!r}: only one prompt method can be attached")
    if model.get_input_embeddings() is None:
        raise ValueError("virtual tokens need a model with input embeddings (get_input_embeddings() is None)")
    model.add_module(PROMPT_MODULE_NAME, prompt)
    prompt.positional = [
        p.name for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return [
        model.register_forward_pre_hook(prompt.before_model, with_kwargs=True),
        model.register_forward_hook(prompt.after_model, with_kwargs=True),
    ]


def uninstall(model: nn.Module, hooks: list[RemovableHandle]) -> None:
    """Remove the hooks and the prompt module: the model is the plain base model again."""
    for hook in hooks:
        hook.remove()
    if hasattr(model, PROMPT_MODULE_NAME):
        delattr(model, PROMPT_MODULE_NAME)


def cached_length(cache: Any) -> int:
    """Tokens already in a KV cache (a transformers Cache or a legacy tuple of per-layer (key, value))."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def prepend_prompt(model: nn.Module, prompt: VirtualTokens, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Inputs of a first call with the prompt in front (see the module docstring)."""
    n = prompt.num_virtual_tokens
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        if input_ids is None:
            raise ValueError("pass input_ids or inputs_embeds")
        embeds = model.get_input_embeddings()(input_ids)
    batch, length = embeds.shape[:2]
    # PEFT computes the prompt once and repeats it over the batch (peft_model.get_prompt).
    virtual = prompt().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = prepend_ones(kwargs["attention_mask"], n)
    if kwargs.get("token_type_ids") is not None:  # segment 0 for the prompt (PEFT drops token types instead)
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
    if kwargs.get("position_ids") is not None:
        positions = kwargs["position_ids"]
        first = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(*positions.shape[:-1], n)
        kwargs["position_ids"] = torch.cat([first, positions + n], dim=-1)
    if kwargs.get("cache_position") is not None:  # transformers < 5 numbers cache slots explicitly
        slots = kwargs["cache_position"]
        kwargs["cache_position"] = torch.cat([torch.arange(n, device=slots.device, dtype=slots.dtype), slots + n])
    for key in ("labels", "shift_labels"):
        if kwargs.get(key) is not None:
            kwargs[key] = prepend_ignored_labels(kwargs[key], n, first_is_target=key == "shift_labels")
    if "logits_to_keep" in kwargs:
        kwargs["logits_to_keep"] = shift_logits_to_keep(kwargs["logits_to_keep"], n, length)
    return kwargs


def extend_decoding_inputs(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """Inputs of a cached decoding step: the cache holds the virtual tokens, the mask and positions must too."""
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = prepend_ones(kwargs["attention_mask"], n)
    for key in ("position_ids", "cache_position"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key] + n
    return kwargs


def prepend_ones(mask: torch.Tensor, n: int) -> torch.Tensor:
    if mask.dim() != 2:
        raise ValueError(f"virtual-token methods need a 2-D attention mask [batch, length], got {mask.dim()}-D "
                         "(compiled/static caches build 4-D masks; use a dynamic cache)")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def prepend_ignored_labels(labels: torch.Tensor, n: int, first_is_target: bool) -> torch.Tensor:
    """``labels`` (aligned with input_ids) or ``shift_labels`` (already shifted) over ``[virtual | real]``."""
    labels = labels.clone()
    if not first_is_target:
        # The last virtual position would predict labels[:, 0], which nothing predicts without virtual tokens.
        labels[:, 0] = IGNORE_INDEX
    return torch.cat([labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels], dim=1)


def shift_logits_to_keep(keep: int | torch.Tensor, n: int, length: int) -> int | torch.Tensor:
    """``logits_to_keep`` over the real tokens, re-expressed over ``[virtual | real]`` (see slice_logits_to_keep)."""
    if isinstance(keep, int):
        # 0 keeps everything (the hook strips the virtual rows after); k >= length keeps all real positions.
        return 0 if keep == 0 else min(keep, length)
    if keep.dtype == torch.bool:
        return torch.cat([keep.new_zeros(keep.shape[0], n), keep], dim=1)
    return keep + n  # positions (1-D for every row, or 2-D per row)


def strip_outputs(output: Any, n: int, logits_hold_virtual: bool) -> Any:
    """Drop the virtual positions from the logits (when all positions were kept), hidden states and attentions."""
    if logits_hold_virtual and getattr(output, "logits", None) is not None:
        output.logits = output.logits[:, n:]
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
    if getattr(output, "attentions", None) is not None:
        output.attentions = tuple(a[..., n:, n:] for a in output.attentions)
    return output


class VirtualTokensHandle(MethodHandle):
    """Handle of a virtual-token method: saves what the prompt module outputs, as PEFT's ``prompt_embeddings``."""

    peft_type: str = ""

    def __init__(self, model: nn.Module, config: MethodConfig, hooks: list[RemovableHandle]):
        super().__init__(model, config)
        self.hooks = hooks

    @property
    def prompt(self) -> VirtualTokens:
        return getattr(self.model, PROMPT_MODULE_NAME)

    def state_dict(self) -> dict[str, torch.Tensor]:
        # PEFT saves the prompt module's output [num_virtual_tokens, token_dim] under this single un-prefixed key.
        with torch.no_grad():
            return {"prompt_embeddings": self.prompt().detach().float()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"prompt_embeddings"}:
            raise KeyError(f"a {self.peft_type} adapter holds exactly 'prompt_embeddings', got {sorted(state)[:5]}")
        if not isinstance(self.prompt, PromptEmbedding):
            raise TypeError("saved prompt embeddings load into a fixed prompt; use Method.load(model, dir)")
        table = self.prompt.embedding.weight
        if tuple(state["prompt_embeddings"].shape) != tuple(table.shape):
            raise ValueError(f"prompt_embeddings: saved shape {tuple(state['prompt_embeddings'].shape)} != "
                             f"model {tuple(table.shape)} (num_virtual_tokens, hidden size)")
        with torch.no_grad():
            table.copy_(state["prompt_embeddings"])

    def adapter_config(self) -> dict[str, Any]:
        """The fields every PEFT prompt-learning config carries (PromptLearningConfig)."""
        dims = model_dims(self.model)
        return {
            "peft_type": self.peft_type,
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.prompt.num_virtual_tokens,
            "token_dim": dims["hidden_size"],
            "num_layers": dims["num_layers"],
            "num_attention_heads": dims["num_heads"],
            "num_transformer_submodules": 1,  # decoder-only
            "modules_to_save": None,
            "inference_mode": True,
        }

    def remove(self) -> nn.Module:
        """Take the prompt and its hooks off: the model is the plain base model again."""
        uninstall(self.model, self.hooks)
        return self.model


def check_peft_prompt_config(data: dict[str, Any], peft_type: str, model: nn.Module) -> dict[str, Any]:
    """A saved ``adapter_config.json``, checked against ``model`` (hidden size, decoder-only)."""
    path = ADAPTER_CONFIG_NAME
    if data.get("peft_type") != peft_type:
        raise ValueError(f"{path}: peft_type {data.get('peft_type')!r}, expected {peft_type!r}")
    if (data.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{path}: an encoder-decoder prompt (num_transformer_submodules=2) needs a decoder-only model")
    hidden = model_dims(model)["hidden_size"]
    if data.get("token_dim") not in (None, hidden):
        raise ValueError(f"{path}: token_dim {data['token_dim']} != the model's hidden size {hidden}")
    return data
