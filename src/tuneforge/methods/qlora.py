"""QLoRA: LoRA on a frozen base quantised to 4 bits (Dettmers et al. 2023, arXiv:2305.14314).

The base model's linear layers hold 4-bit NormalFloat (NF4) weights from bitsandbytes, with the per-block scales
themselves quantised ("double quantisation"); each matmul de-quantises a block on the fly into the compute dtype.
The LoRA factors are ordinary tensors in that compute dtype and are the only thing that trains, so memory is
~0.5 byte per base weight instead of 2.

A 4-bit base comes from one of two places:
  * ``qlora_quantization_config(config)`` -> ``transformers.BitsAndBytesConfig`` for loading a checkpoint
    straight into 4 bits (``tuneforge.models.loading.load_model(..., quantization_config=...)``);
  * ``quantize_model_(model, config)``, which swaps the linear layers of an already-loaded float model for
    ``bitsandbytes.nn.Linear4bit`` in place (tiny test models, GGUF-converted models). ``QLoRA.attach`` does
    this itself when the model is not 4-bit yet.
Both quantise the same layers with the same bitsandbytes call, so they give bit-identical weights.

bitsandbytes' packed CPU layout is kept off (see ``keep_training_layout_``): on CPUs with AVX-512 BF16 it would
repack a layer's weight during any gradient-free eval pass into an inference-only layout with no backward, bf16
arithmetic, and shape limits that crash inside bitsandbytes.

The adapter is saved as plain PEFT LoRA: quantisation belongs to the base model. ``merge_to_16bit`` de-quantises
the base, folds the LoRA update in, and returns an ordinary float model; ``merge_with_report`` also says how far
its logits moved from the unmerged 4-bit model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .base import output_embedding_names, register, replace_module
from .lora import LoRA, LoRAConfig, LoRAHandle, LoRALinear, attach_lora, config_from_peft

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = {"uint8": torch.uint8, **DTYPES}
# Block sizes bitsandbytes 0.50's 4-bit kernels accept (its CPU and CUDA checks; older releases start at 64).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass
class QLoRAConfig(LoRAConfig):
    """Options of QLoRA: every LoRA option, plus how the frozen base is quantised (bitsandbytes' names)."""

    method: ClassVar[str] = "qlora"

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the base weights: NF4 (the paper's, optimal for normally distributed weights) or FP4."""
    bnb_4bit_use_double_quant: bool = True
    """Quantise the per-block scales too (8-bit, blocks of 256): saves ~0.37 bit per weight at no measurable cost."""
    bnb_4bit_blocksize: int = 64
    """Weights per quantisation block (one scale each); smaller is more precise and larger. Loading through
    transformers (``qlora_quantization_config``) only supports 64."""
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the 4-bit weights are de-quantised to for each matmul, and the LoRA factors' dtype. auto: the dtype
    the model was loaded in (bf16 on a GPU that supports it, float32 on CPU)."""
    bnb_4bit_quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = "uint8"
    """Tensor dtype the packed 4-bit values are stored in; a float storage lets FSDP shard them with the rest."""

    def __post_init__(self):
        super().__post_init__()
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}")
        if self.bnb_4bit_blocksize not in BLOCKSIZES:
            raise ValueError(f"bnb_4bit_blocksize must be one of {BLOCKSIZES}, got {self.bnb_4bit_blocksize}")
        if self.bnb_4bit_compute_dtype != "auto" and self.bnb_4bit_compute_dtype not in DTYPES:
            raise ValueError(f"bnb_4bit_compute_dtype must be auto or one of {sorted(DTYPES)}, "
                             f"got {self.bnb_4bit_compute_dtype!r}")
        if self.bnb_4bit_quant_storage not in STORAGE_DTYPES:
            raise ValueError(f"bnb_4bit_quant_storage must be one of {sorted(STORAGE_DTYPES)}, "
                             f"got {self.bnb_4bit_quant_storage!r}")

    def compute_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.bnb_4bit_compute_dtype == "auto" else DTYPES[self.bnb_4bit_compute_dtype]


# -- getting a 4-bit base -------------------------------------------------------------------------------------


def qlora_quantization_config(config: QLoRAConfig, dtype: torch.dtype | None = None):
    """The ``transformers.BitsAndBytesConfig`` that loads a checkpoint straight into 4 bits.

    ``dtype`` is the dtype the model is loaded in; it resolves ``bnb_4bit_compute_dtype="auto"``.
    """
    from transformers import BitsAndBytesConfig

    if config.bnb_4bit_blocksize != 64:
        raise ValueError(
            f"bnb_4bit_blocksize={config.bnb_4bit_blocksize}: transformers' BitsAndBytesConfig always uses "
            "bitsandbytes' block size 64; load the model in float and let QLoRA quantise it (quantize_model_)"
        )
    if dtype is None:
        from ..models.loading import default_device, default_dtype

        dtype = default_dtype(default_device())
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=config.compute_dtype(dtype),
        bnb_4bit_quant_storage=STORAGE_DTYPES[config.bnb_4bit_quant_storage],
    )


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def is_4bit_model(model: nn.Module) -> bool:
    return any(is_4bit(m) for m in model.modules())


def quantizable_names(model: nn.Module) -> list[str]:
    """Linear layers (and GPT-2's Conv1D) to quantise: all but the output head and the module owning the last
    parameter — the layers transformers' bitsandbytes loader skips (``get_keys_to_not_convert``)."""
    skip = output_embedding_names(model)
    params = list(model.named_parameters())
    if params:
        skip.add(params[-1][0].rpartition(".")[0])
    return [
        name for name, m in model.named_modules()
        if name and name not in skip and (type(m) is nn.Linear or type(m).__name__ == "Conv1D")
    ]


def quantize_linear(layer: nn.Module, config: QLoRAConfig) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding ``layer``'s weight in 4 bits (the bias stays in float)."""
    import bitsandbytes as bnb

    weight = layer.weight.detach()
    if type(layer).__name__ == "Conv1D":
        weight = weight.T  # Conv1D stores [in, out]; transformers transposes it the same way before quantising
    out_features, in_features = weight.shape
    storage = STORAGE_DTYPES[config.bnb_4bit_quant_storage]
    quant = dict(compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type,
                 quant_storage=storage)
    new = bnb.nn.Linear4bit(in_features, out_features, bias=layer.bias is not None,
                            compute_dtype=config.compute_dtype(weight.dtype), device="meta", **quant)
    # Params4bit quantises when moved to a device: on the layer's own device, so a GPU model quantises on the GPU.
    new.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=config.bnb_4bit_blocksize,
                                   module=new, **quant).to(weight.device)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    new.train(layer.training)
    new.source_cls = type(layer)  # as transformers records it: merge_to_16bit turns a Conv1D back into one
    return new


@torch.no_grad()
def quantize_model_(model: nn.Module, config: QLoRAConfig) -> list[str]:
    """Replace the model's float linear layers by 4-bit ones in place; returns the replaced module names."""
    names = quantizable_names(model)
    if not names:
        raise ValueError("no float linear layer to quantise (is the model already quantised?)")
    for name in names:
        replace_module(model, name, quantize_linear(model.get_submodule(name), config))
    # transformers sets this flag after a 4-bit load; PEFT reads it to pick its bitsandbytes LoRA layers.
    model.is_loaded_in_4bit = True
    keep_training_layout_(model)
    return names


# -- bitsandbytes' packed CPU layout ---------------------------------------------------------------------------
# On a CPU with AVX-512 BF16, bitsandbytes (>= 0.49) repacks a Linear4bit's weight the first time the layer runs in
# eval mode on an input without gradients (an eval pass, generation), for a bf16 inference kernel, and keeps it
# packed from then on. For a model that trains, that layout is wrong three ways, each measured on bitsandbytes 0.50:
#   * its matmul has no backward: after one eval pass, training sends no gradient through the frozen base to the
#     layer's input, so every LoRA factor below the layer gets a wrong gradient, silently;
#   * it computes in bf16 whatever bnb_4bit_compute_dtype says, so evaluation no longer matches training;
#   * the conversion exists only for out_features divisible by 32 and in_features divisible by the block size;
#     any other layer crashes inside bitsandbytes (``shape '[32, 0]' is invalid``, ``N must be divisible by
#     block_n``); packing rounds the block scales to bf16 for good, and its inverse scrambles them without double
#     quantisation (unpack_cpu_layout_ repairs that).
# So tuneforge keeps every 4-bit layer in bitsandbytes' portable layout, on every CPU and GPU: all layers, whatever
# their shape, stay 4-bit and compute in the compute dtype, with gradients.


def cpu_packed(layer: nn.Module) -> bool:
    """Whether bitsandbytes has repacked this 4-bit layer for its AVX-512 BF16 inference kernel."""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def unpack_cpu_layout_(layer: nn.Module) -> None:
    """Bring a layer bitsandbytes packed for its CPU inference kernel back to the portable layout, in place."""
    import bitsandbytes.functional as F

    if not cpu_packed(layer):
        return
    data, state = F._convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
    if state.absmax.dim() == 2:
        # bitsandbytes (0.50) restores the per-block scales only under double quantisation; otherwise it leaves them
        # in the kernel's [blocks per row, out_features] bf16 layout, which dequantize_4bit reads in the wrong order
        # (max error 2.2 on N(0, 1) weights). One float32 scale per block, row-major, as before packing (their bf16
        # rounding at packing time cannot be undone).
        state.absmax = state.absmax.T.reshape(-1).float()
    layer.weight.data, layer.weight.quant_state = data, state
    layer.quant_state = state


def keep_training_layout_(model: nn.Module) -> int:
    """Turn bitsandbytes' packed CPU layout off for every 4-bit layer of ``model`` (see above), unpacking any
    layer already packed (a model that ran inference before QLoRA was attached). Returns how many were unpacked."""
    unpacked = 0
    for layer in model.modules():
        if not is_4bit(layer):
            continue
        if hasattr(layer, "support_avx512bf16_for_cpu"):  # bitsandbytes' own per-layer switch (0.49+)
            layer.support_avx512bf16_for_cpu = False
        if cpu_packed(layer):
            unpack_cpu_layout_(layer)
            unpacked += 1
    return unpacked


def quantization_summary(model: nn.Module) -> dict[str, Any]:
    """How the base is quantised, read from its first 4-bit layer."""
    layers = [m for m in model.modules() if is_4bit(m)]
    if not layers:
        return {}
    weight = layers[0].weight
    return {
        "quant_type": weight.quant_type,
        "double_quant": bool(weight.compress_statistics),
        "blocksize": int(weight.blocksize),
        "compute_dtype": str(layers[0].compute_dtype).removeprefix("torch."),
        "quant_storage": str(weight.quant_storage).removeprefix("torch."),
        "num_4bit_layers": len(layers),
        # 0 unless something bypassed keep_training_layout_: bitsandbytes' inference-only CPU layout (see above).
        "cpu_packed_layers": sum(cpu_packed(m) for m in layers),
    }


# -- merging ---------------------------------------------------------------------------------------------------


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The float32 [out, in] weight a 4-bit layer stands for."""
    import bitsandbytes.functional as F

    unpack_cpu_layout_(layer)  # a model that ran bitsandbytes' CPU inference kernel before it reached us
    return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def dense_linear(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """An nn.Linear with ``weight`` [out, in], or a Conv1D again where the 4-bit layer replaced one (GPT-2), so
    the merged model saves and reloads as its own architecture."""
    out_features, in_features = weight.shape
    source = getattr(layer, "source_cls", nn.Linear)
    if source.__name__ == "Conv1D":
        dense = source(out_features, in_features).to(device=weight.device, dtype=dtype)
        weight = weight.T
    else:
        dense = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype)
    dense.weight.data.copy_(weight)
    if layer.bias is not None:
        dense.bias.data.copy_(layer.bias.detach())
    dense.requires_grad_(False)
    return dense


@torch.no_grad()
def merge_to_16bit(handle: LoRAHandle, dtype: torch.dtype | str | None = None) -> nn.Module:
    """De-quantise every 4-bit weight, add its LoRA update (ΔW = B A · scale, in float32), and return the handle's
    model converted in place to a plain Hugging Face model of nn.Linear layers in ``dtype``.

    ``dtype`` defaults to the dtype the rest of the model was loaded in (bf16 on a GPU, float32 on CPU), so merging
    adds no rounding beyond the 4-bit weights' own. The handle is spent afterwards: its model has no LoRA layers.
    """
    model = handle.model
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or model.get_input_embeddings().weight.dtype
    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, layer in adapted:
        base = layer.base_layer
        if is_4bit(base):
            replace_module(model, name, dense_linear(base, layer.merged_weight(dequantize(base)), dtype))
        else:
            layer.merge()
            replace_module(model, name, base)
    for name in [n for n, m in model.named_modules() if is_4bit(m)]:  # quantised layers LoRA did not target
        layer = model.get_submodule(name)
        replace_module(model, name, dense_linear(layer, dequantize(layer), dtype))
    forget_quantization(model)  # before .to(dtype): transformers refuses to cast a bitsandbytes model
    model.to(dtype)
    handle.module_names = []
    return model


def forget_quantization(model: nn.Module) -> None:
    """Drop the 4-bit markers (as transformers' ``remove_quantization_config``), so the model casts to a new dtype,
    and save_pretrained writes, from_pretrained reads, an ordinary float model."""
    model.is_loaded_in_4bit = False
    for name in ("hf_quantizer", "quantization_method"):
        if name in vars(model):
            delattr(model, name)
    if getattr(model, "hf_quantizer", None) is not None:  # a class-level default
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config


@torch.no_grad()
def logits_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    finally:
        model.train(was_training)


def merge_with_report(handle: LoRAHandle, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      dtype: torch.dtype | str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``merge_to_16bit`` plus how far the merged model's logits are from the unmerged 4-bit model's on the given
    inputs (over real tokens only): ``max_abs_diff``, ``mean_abs_diff``, and ``logit_std`` for scale."""
    device = next(handle.model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(input_ids)
    reference = logits_of(handle.model, input_ids, attention_mask)
    merged = merge_to_16bit(handle, dtype)
    keep = attention_mask.bool()
    diff = (logits_of(merged, input_ids, attention_mask) - reference)[keep].abs()
    report = {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "logit_std": reference[keep].std().item(),
        "dtype": str(merged.dtype).removeprefix("torch."),
        "tokens": int(keep.sum()),
    }
    return merged, report


# -- the method ------------------------------------------------------------------------------------------------


class QLoRAHandle(LoRAHandle):
    config: QLoRAConfig

    def merge(self) -> None:
        raise RuntimeError("a 4-bit base cannot take the LoRA update in place; use "
                           "tuneforge.methods.qlora.merge_to_16bit(handle, dtype) (it de-quantises first)")

    def merge_to_16bit(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        """See the module function ``merge_to_16bit``."""
        return merge_to_16bit(self, dtype)

    def merge_and_unload(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        """De-quantise, fold the update in, return a plain float model (``merge_to_16bit``)."""
        return merge_to_16bit(self, dtype)

    def summary(self) -> dict[str, Any]:
        return {"quantization": quantization_summary(self.model)}


@register
class QLoRA(LoRA):
    name = "qlora"
    aliases = ("q_lora",)
    config_class = QLoRAConfig
    # A PEFT "LORA" adapter loads as LoRA (on a 4-bit base too); tuneforge's own record says "qlora".
    peft_type = None

    @classmethod
    def model_load_kwargs(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Load the checkpoint straight into 4 bits; a block size transformers cannot do is quantised in attach."""
        config = cls.config_class.from_dict(options)
        if config.bnb_4bit_blocksize != 64:
            return {}
        return {"quantization_config": qlora_quantization_config(config)}

    @classmethod
    def attach(cls, model: nn.Module, config: QLoRAConfig) -> QLoRAHandle:
        if not is_4bit_model(model):
            quantize_model_(model, config)
        keep_training_layout_(model)  # transformers' 4-bit loader leaves bitsandbytes' packing switch on
        return QLoRAHandle(model, config, attach_lora(model, config))

    @classmethod
    def config_from_saved(cls, saved: dict[str, Any], options: dict[str, Any], model: nn.Module) -> QLoRAConfig:
        # The quantisation options live only in tuneforge's record (PEFT's file describes the LoRA part).
        quantisation = {k: v for k, v in options.items() if k.startswith("bnb_4bit_")}
        return QLoRAConfig(**config_from_peft(saved), **quantisation)
