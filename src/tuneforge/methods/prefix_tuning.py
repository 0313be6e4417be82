"""Prefix Tuning: trainable key/value prefixes in the attention of every layer (Li & Liang 2021, arXiv:2101.00190).

Each layer's attention sees ``N`` extra key/value pairs in front of the real tokens, as if ``N`` "virtual
tokens" had been processed before the input; the model's weights stay frozen. Training the prefix directly is
unstable (paper §4.3), so it is reparameterised: ``P = MLP(P')`` with ``P'`` a small ``[N, d]`` embedding and the
MLP ``Linear(d, h) → tanh → Linear(h, num_layers·2·d)`` — PEFT's ``PrefixEncoder`` with ``prefix_projection``,
same module names, same parameter count. Only the MLP's *output* matters after training, so it is folded away at
save time: ``prompt_embeddings`` ``[N, num_layers·2·d]`` is what PEFT stores and loads.

Under grouped-query attention ``d`` is the key/value width ``num_key_value_heads · head_dim``, not the hidden size
(PEFT's ``_prepare_prompt_learning_config``: ``token_dim`` and ``num_attention_heads`` are rewritten to the KV
shape). The flat vector of a virtual token is laid out ``[layer, key|value, kv_head, head_dim]``, as PEFT's
``get_prompt`` views it.

Injection goes through the KV cache, so the real tokens are the only sequence the model computes: a forward
pre-hook on the model (1) puts the prefix into a fresh ``DynamicCache`` when the caller brings none (or an empty
one, as ``generate`` does), (2) prepends ``N`` ones to the 2-D attention mask on every call, cached decoding
steps included, and (3) shifts explicit ``position_ids`` by ``N``. Logits, ``labels`` and a ``logits_to_keep``
mask stay over the real tokens only. Real tokens sit at positions ``N, N+1, …`` — where the paper's GPT-2 code
and PEFT put them (the model numbers a new token after what its cache holds) — so PEFT and tuneforge compute the
same logits.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Method, MethodConfig, MethodHandle, Switchable, freeze, model_dims, register
from .kv_cache import cache_from_kwargs, cache_kwarg, output_cache, set_cache

# Layer kinds whose attention appends to a DynamicCache (a prefix has nowhere to go in a linear-attention layer).
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}


@dataclasses.dataclass
class PrefixTuningConfig(MethodConfig):
    """Options of Prefix Tuning (names as in PEFT's ``PrefixTuningConfig``)."""

    default_prefix_init: ClassVar[str] = "random"

    num_virtual_tokens: int = 20
    """Length N of the prefix every layer attends to. The paper's best lengths were ~10 for table-to-text and
    ~200 for summarisation; longer prefixes add capacity and attention cost."""
    prefix_projection: bool = True
    """Train the prefix through the MLP reparameterisation (the paper's stabiliser). False trains the key/value
    prefix itself (P-Tuning v2)."""
    encoder_hidden_size: int | None = None
    """Hidden width h of the reparameterisation MLP; None uses the key/value width d, as PEFT does."""
    prefix_init: str | None = None
    """How a directly trained prefix (prefix_projection false) starts; None: the method's default (random here,
    vocab for P-Tuning v2; always random through the MLP). "random": N(0, 1), as PEFT and the papers' code.
    "vocab": the frozen model's own keys and values for N random vocabulary tokens, so at step 0 the model sees
    what looks like N real tokens before the input (Li & Liang §7: real activations beat random ones), instead
    of N(0, 1) keys that swamp every layer's attention."""

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0
        ):
            raise ValueError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}")
        if self.prefix_init is None:
            self.prefix_init = "random" if self.prefix_projection else self.default_prefix_init
        if self.prefix_init not in ("random", "vocab"):
            raise ValueError(f"prefix_init must be random or vocab, got {self.prefix_init!r}")
        if self.prefix_init != "random" and self.prefix_projection:
            raise ValueError("prefix_init vocab sets the prefix itself: it needs prefix_projection false (the MLP's "
                             "output cannot be set)")


@dataclasses.dataclass(frozen=True)
class PrefixShape:
    """Where the prefix goes: PEFT's ``num_layers``, ``num_attention_heads`` (KV heads) and ``token_dim``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def of(cls, model: nn.Module) -> "PrefixShape":
        dims = model_dims(model)
        return cls(dims["num_layers"], dims["num_kv_heads"], dims["head_dim"])


class PrefixEncoder(nn.Module, Switchable):
    """Produces the flat prefix ``[N, num_layers·2·token_dim]``; PEFT's ``PrefixEncoder`` (same names, same init).

    With projection: ``embedding`` ``[N, token_dim]`` → ``transform`` (Linear, Tanh, Linear). Without: ``embedding``
    is the prefix itself. ``nn.Embedding``'s N(0, 1) and ``nn.Linear``'s default initialisation are what PEFT and
    both papers' reference code use.
    """

    def __init__(self, num_virtual_tokens: int, shape: PrefixShape, prefix_projection: bool, encoder_hidden_size: int,
                 device: torch.device | None = None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.shape = shape
        self.prefix_projection = prefix_projection
        out_dim = shape.num_layers * 2 * shape.token_dim
        factory = dict(device=device, dtype=torch.float32)  # as PEFT: the prompt encoder trains in float32
        if prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, shape.token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(shape.token_dim, encoder_hidden_size, **factory),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, out_dim, **factory),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim, **factory)

    def forward(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by its output: what PEFT saves and what its inference mode runs."""
        if not self.prefix_projection:
            return
        prefix = self.forward()
        self.embedding = nn.Embedding.from_pretrained(prefix.clone(), freeze=False)
        del self.transform
        self.prefix_projection = False

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)`` of shape ``[batch, kv_heads, N, head_dim]`` (PEFT's view + permute)."""
        s = self.shape
        flat = self.forward().to(dtype)
        kv = flat.view(self.num_virtual_tokens, s.num_layers * 2, s.num_kv_heads, s.head_dim).permute(1, 2, 0, 3)
        expand = (batch_size, -1, -1, -1)
        return [(kv[2 * i].unsqueeze(0).expand(expand), kv[2 * i + 1].unsqueeze(0).expand(expand))
                for i in range(s.num_layers)]


class PrefixInjector:
    """The model's forward pre-hook: adds the prefix to the cache and N ones to the mask; real tokens only outside."""

    def __init__(self, model: nn.Module, encoder: PrefixEncoder):
        self.model = model
        self.encoder = encoder
        sig = inspect.signature(model.forward)
        self.positional = [p.name for p in sig.parameters.values()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # Where the prefix cache goes when the caller brings none: `cache` from transformers 5.24, else
        # `past_key_values` (passing the old name to a 5.24 model warns on every training step).
        self.cache_key = cache_kwarg(model)
        self.hook = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.encoder.adapter_enabled:
            return None  # disabled(): the untouched base model
        if module.training and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules()):
            # transformers' checkpointed layers drop the KV cache, which would silently drop the prefix.
            raise RuntimeError("prefix tuning injects through the KV cache, which transformers' gradient "
                               "checkpointing disables; turn gradient checkpointing off")
        kwargs = {**dict(zip(self.positional, args)), **kwargs}
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        batch_size = tokens.shape[0]
        n = self.encoder.num_virtual_tokens
        # generate passes `cache` from transformers 5.24 on, older callers `past_key_values`: read either, so a
        # decoding step is never mistaken for a first call (which would put the prefix in the cache again).
        key, cache = cache_from_kwargs(kwargs)
        if cache is None or cache.get_seq_length() == 0:
            # Back under the caller's keyword (the model's own when none was passed), never under both: given both,
            # 5.24 warns and uses `cache` alone.
            set_cache(kwargs, key or self.cache_key, self.prefix_cache(batch_size, cache))
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"prefix tuning needs a 2-D attention mask [batch, seq], got {tuple(mask.shape)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch_size, n), mask], dim=1)
        # The prefix occupies positions 0..N-1 (PEFT's _adjust_prompt_learning_kwargs adds N the same way).
        for key in ("position_ids", "cache_position"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + n
        return (), kwargs

    def prefix_cache(self, batch_size: int, cache=None):
        """A cache holding only the prefix: built afresh each call, so every forward's graph reaches the encoder."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.model.config)
        elif not isinstance(cache, DynamicCache):
            raise ValueError(f"prefix tuning fills a DynamicCache; got {type(cache).__name__} (use the default cache)")
        dtype = self.model.get_input_embeddings().weight.dtype
        for layer_idx, (key, value) in enumerate(self.encoder.key_values(batch_size, dtype)):
            cache.update(key, value, layer_idx)
        return cache


class PrefixTuningHandle(MethodHandle):
    config: PrefixTuningConfig

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, encoder: PrefixEncoder):
        super().__init__(model, config)
        self.encoder = encoder
        self.injector = PrefixInjector(model, encoder)

    def state_dict(self) -> dict[str, torch.Tensor]:
        # PEFT saves the encoder's output (get_prompt_embedding_to_save), never the MLP.
        with torch.no_grad():
            return {"prompt_embeddings": self.encoder().detach().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a saved prefix. The MLP cannot be recovered from its output, so a projecting encoder is folded first
        (the handle then trains the prefix directly, as PEFT's inference mode holds it)."""
        unexpected = sorted(set(state) - {"prompt_embeddings"})
        if "prompt_embeddings" not in state or unexpected:
            raise KeyError(f"prefix-tuning weights hold one tensor 'prompt_embeddings'; got {sorted(state)}")
        saved = state["prompt_embeddings"]
        self.encoder.fold()
        target = self.encoder.embedding.weight
        if saved.shape != target.shape:
            raise ValueError(f"prompt_embeddings: saved shape {tuple(saved.shape)} != model {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(saved)

    def adapter_config(self) -> dict[str, Any]:
        s = self.encoder.shape
        return {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.config.num_virtual_tokens,
            "token_dim": s.token_dim,
            "num_layers": s.num_layers,
            "num_attention_heads": s.num_kv_heads,  # PEFT stores the KV heads here under GQA
            "num_transformer_submodules": 1,
            "encoder_hidden_size": self.config.encoder_hidden_size or s.token_dim,
            "prefix_projection": self.config.prefix_projection,
            "init_weights": None,
            "inference_mode": True,
            "modules_to_save": None,
            "revision": None,
            "auto_mapping": None,
        }

    def remove(self) -> nn.Module:
        """Take the hook and the encoder out of the model: the plain base model again."""
        self.injector.hook.remove()
        del self.model.prefix_encoder
        return self.model


def check_architecture(model: nn.Module) -> None:
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError("tuneforge's prefix tuning supports decoder-only causal LMs")
    layer_types = getattr(cfg.get_text_config(decoder=True), "layer_types", None) or []
    odd = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
    if odd:
        raise ValueError(f"prefix tuning needs attention in every layer; this model has {', '.join(odd)} layers")


def attach_prefix(model: nn.Module, config: PrefixTuningConfig) -> PrefixEncoder:
    """Freeze the model and register the prefix encoder as ``model.prefix_encoder``; returns it."""
    check_architecture(model)
    freeze(model)
    shape = PrefixShape.of(model)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    # Drawn before the encoder's own random init, so the seed alone fixes which tokens the prefix imitates.
    tokens = torch.randint(0, vocab_size, (1, config.num_virtual_tokens)) if config.prefix_init == "vocab" else None
    encoder = PrefixEncoder(config.num_virtual_tokens, shape, config.prefix_projection,
                            config.encoder_hidden_size or shape.token_dim,
                            device=model.get_input_embeddings().weight.device)
    if tokens is not None:
        with torch.no_grad():
            encoder.embedding.weight.copy_(own_key_values(model, tokens.to(encoder.embedding.weight.device)))
    # A submodule, so the trainer's optimiser, .to() and the trainable-parameter count all see it.
    model.prefix_encoder = encoder
    return encoder


@torch.no_grad()
def own_key_values(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The flat prefix ``[N, num_layers·2·token_dim]`` that reproduces the model's own cache for ``tokens``
    ``[1, N]`` at positions 0..N-1: the inverse of ``PrefixEncoder.key_values``."""
    was_training = model.training
    model.eval()
    cache = output_cache(model(input_ids=tokens, use_cache=True))  # `.past_key_values` warns from transformers 5.24
    model.train(was_training)
    per_layer = [t[0] for layer in cache.layers for t in (layer.keys, layer.values)]  # [kv_heads, N, head_dim] each
    stacked = torch.stack(per_layer)  # [num_layers·2, kv_heads, N, head_dim]
    return stacked.permute(2, 0, 1, 3).reshape(tokens.shape[1], -1).float()


def config_from_peft(data: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Config options from a PEFT ``adapter_config.json``, after checking its prefix fits ``model``."""
    if data.get("num_transformer_submodules", 1) != 1:
        raise ValueError("this prefix adapter is for an encoder-decoder model; tuneforge supports causal LMs")
    shape = PrefixShape.of(model)
    saved = (data.get("num_layers"), data.get("num_attention_heads"), data.get("token_dim"))
    if saved != (shape.num_layers, shape.num_kv_heads, shape.token_dim):
        raise ValueError(f"prefix adapter shape (num_layers, num_attention_heads, token_dim) = {saved} does not fit "
                         f"this model: {(shape.num_layers, shape.num_kv_heads, shape.token_dim)}")
    # The saved values replace the initial prefix, so the cheap random init is enough.
    return dict(num_virtual_tokens=data["num_virtual_tokens"], prefix_projection=bool(data.get("prefix_projection")),
                encoder_hidden_size=data.get("encoder_hidden_size"), prefix_init="random")


@register
class PrefixTuning(Method):
    name = "prefix_tuning"
    packing_refusal = ("it puts its prefix keys and values at the start of every row: in a packed row only the first "
                       "example would see them")
    config_class = PrefixTuningConfig
    flag_prefix = "prefix"  # --prefix-num-virtual-tokens 20
    aliases: ClassVar[tuple[str, ...]] = ("prefix",)
    peft_type = "PREFIX_TUNING"
    # The MLP amplifies updates: 1e-3 brings SmolLM2-135M's demo SFT loss from 0.64 to <0.01 in 30 steps.
    default_learning_rate = 1e-3

    @classmethod
    def attach(cls, model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningHandle:
        return PrefixTuningHandle(model, config, attach_prefix(model, config))

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module
                          ) -> PrefixTuningConfig:
        return cls.config_class(**config_from_peft(saved, model))
