"""Answers to prompts with images: the processor's inputs (pixels, grids, image tokens) into the model's own
``generate``, which knows each family's image-feature merge and position ids (Qwen2-VL's rotary deltas).

``tuneforge generate --image``, the exact-match evaluation and ``tuneforge serve`` all answer through here, so the
same prompt and image give the same greedy answer everywhere.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..data.formats import Message
from .processor import VisionProcessor


def stop_ids(processor: VisionProcessor, model: nn.Module) -> list[int]:
    ids = {processor.tokenizer.eos_token_id}
    extra = getattr(model.generation_config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_chat(model: nn.Module, processor: VisionProcessor, prompts: Sequence[list[Message]], *,
                  max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, batch_size: int = 8, seed: int | None = 0, sources: list[str] | None = None
                  ) -> list[str]:
    """The decoded answer to each prompt (a message list whose parts may hold images), in order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if do_sample and seed is not None:
        torch.manual_seed(seed)
    options = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, use_cache=True,
                   pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=stop_ids(processor, model))
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # greedy: no sampling settings a saved generation_config might carry
        options.update(temperature=None, top_p=None, top_k=None)
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            inputs = processor.prompt_inputs(chunk, sources[start:start + batch_size] if sources else None)
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            out = model.generate(**inputs, **options)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers += [a.strip() for a in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers
