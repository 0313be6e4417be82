"""``tuneforge merge``: fold a LoRA-family adapter into its base and write a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..inference.loading import default_model, load_for_inference
from ..outputs import check_output, staged_dir


def merge_adapter(adapter_dir: str | Path, output: str | Path, model_name: str | None = None,
                  device: str | None = None, overwrite: bool = False, verify: bool = True) -> dict[str, Any]:
    """Load base + adapter, merge, save ``output`` (safetensors + tokenizer); report how close the logits are.

    The report compares the merged model's logits with the unmerged adapter's on a fixed probe text: merging
    is exact up to float rounding for a float base; a 4-bit base is dequantised first (QLoRA), which is where
    any difference comes from. A method that cannot merge raises ValueError (``MethodHandle.merge_and_unload``).
    ``output`` follows ``outputs.check_output``: never the adapter or the base, a non-empty folder only with
    ``overwrite``; it is written aside and renamed into place whole.

    With ``verify`` the written folder is then compared with the run in float32 (``verify.verify``, against
    ``merged:OUTPUT``): the summary is ``report["verification"]`` and ``OUTPUT/verify.json``.
    """
    model_name = default_model(str(adapter_dir), model_name)
    output = check_output(output, inputs=[adapter_dir, model_name], overwrite=overwrite)
    model, tokenizer, handle = load_for_inference(model_name, str(adapter_dir), device)
    if handle is None:
        raise ValueError(f"{adapter_dir} holds a whole model (full fine-tuning), not an adapter: there is nothing "
                         "to merge; use it as --model directly")
    probe = tokenizer("The quick brown fox jumps over the lazy dog. 1 2 3", return_tensors="pt")
    probe = {k: v.to(next(model.parameters()).device) for k, v in probe.items()}
    with torch.no_grad():
        before = model(**probe).logits.float()
    merged = handle.merge_and_unload()
    with torch.no_grad():
        after = merged(**probe).logits.float()
    with staged_dir(output) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    diff = (after - before).abs()
    report: dict[str, Any] = {"output": str(output), "max_abs_logit_diff": f"{diff.max().item():.3g}",
                              "mean_abs_logit_diff": f"{diff.mean().item():.3g}"}
    if verify:
        from .verify import verify as verify_artefact

        del model, merged, handle  # the reference and the merged folder load afresh
        report["verification"] = verify_artefact(adapter_dir, f"merged:{output}", model=model_name, device=device)
    return report
