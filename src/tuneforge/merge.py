"""``tuneforge merge``: fold a LoRA-family adapter into its base and write a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def merge_adapter(adapter_dir: str | Path, output: str | Path, model_name: str | None = None,
                  device: str | None = None) -> dict[str, Any]:
    """Load base + adapter, merge, save ``output`` (safetensors + tokenizer); report how close the logits are.

    The report compares the merged model's logits with the unmerged adapter's on a fixed probe text: merging
    is exact up to float rounding for a float base; a 4-bit base is dequantised first (QLoRA), which is where
    any difference comes from.
    """
    from .cli import default_model, load_for_inference

    model_name = default_model(str(adapter_dir), model_name)
    model, tokenizer, handle = load_for_inference(model_name, str(adapter_dir), device)
    merge_16bit = getattr(handle, "merge_to_16bit", None)
    probe = tokenizer("The quick brown fox jumps over the lazy dog. 1 2 3", return_tensors="pt")
    probe = {k: v.to(next(model.parameters()).device) for k, v in probe.items()}
    with torch.no_grad():
        before = model(**probe).logits.float()
    if merge_16bit is not None:  # QLoRA: dequantise, merge, write a 16-bit model
        merged = merge_16bit()
    elif hasattr(handle, "merge_and_unload"):
        merged = handle.merge_and_unload()
    else:
        raise ValueError(f"{adapter_dir}: a {type(handle.config).method!r} adapter cannot be merged into the base "
                         "weights (only the LoRA family can); load it with --adapter instead")
    with torch.no_grad():
        after = merged(**probe).logits.float()
    output = Path(output)
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    diff = (after - before).abs()
    return {"output": str(output), "max_abs_logit_diff": f"{diff.max().item():.3g}",
            "mean_abs_logit_diff": f"{diff.mean().item():.3g}"}
