"""Optional GPU kernels (``pip install "tuneforge[gpu]"``): used when installed and the run is on CUDA, named in the
run summary, never needed.

* flash-attn: the model loads with ``attn_implementation="flash_attention_2"``; packed rows (data/packing.py) then
  run its variable-length kernel, which skips the masked blocks SDPA computes and discards.
* liger-kernel: Triton kernels for RMSNorm, RoPE and SwiGLU patched into the model instance (its
  ``_apply_liger_kernel_to_instance``); the loss stays tuneforge's own fused projection + cross-entropy
  (objectives/linear_cross_entropy.py), which every objective shares.

Without them (and always on CPU) everything runs on PyTorch's SDPA and eager ops.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

KERNELS = {"flash_attn": "flash-attn", "liger_kernel": "liger-kernel"}  # module: distribution


def installed() -> dict[str, str]:
    """The optional kernel packages importable here, with their versions."""
    found = {}
    for module, dist in KERNELS.items():
        if importlib.util.find_spec(module) is not None:
            try:
                found[module] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                found[module] = "unknown"
    return found


def usable(device: torch.device | str) -> dict[str, str]:
    """The installed kernels a run on ``device`` uses: all of them on CUDA, none elsewhere (they are GPU code)."""
    return installed() if torch.device(device).type == "cuda" else {}


def attention_implementation(device: torch.device | str, dtype: torch.dtype | None) -> str | None:
    """``flash_attention_2`` where flash-attn is usable (it computes in bf16 / fp16 only), else the default."""
    if "flash_attn" in usable(device) and dtype in (torch.bfloat16, torch.float16):
        return "flash_attention_2"
    return None


def apply_liger(model: nn.Module, device: torch.device | str) -> bool:
    """Patch liger-kernel's RMSNorm / RoPE / SwiGLU into ``model`` where usable; True when it did. An architecture
    or release it does not know leaves the model as it was (logged), never a failed run."""
    if "liger_kernel" not in usable(device):
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    except Exception as e:  # an unsupported model type, or an API that moved
        log.warning("liger-kernel left unused: %s: %s", type(e).__name__, e)
        return False
    return True
