"""The ``target_modules`` / ``target_parameters`` of a saved LoRA file, written so PEFT adapts exactly our layers.

PEFT resolves the names in ``adapter_config.json`` again when it loads the file, with its own rules, so the names
must be chosen for those rules, not ours:

* A list entry selects every module whose name equals it or ends with ``.<entry>``; a string is a regex matched
  against full names. Short names (``q_proj``) are written when they select exactly our layers, else one regex.
* On MoE models whose layout transformers 5 changed (Mixtral-, Qwen2-MoE-style: Qwen3-MoE, DeepSeek-V2/V3, GLM-4
  MoE, OLMoE, ...), PEFT 0.18+ rewrites the config for the old v4 layout before matching: every ``target_modules``
  entry named (or ending in) ``gate_proj``, ``up_proj``, ``down_proj``, ``w1``/``w2``/``w3`` or ``gate`` becomes
  the *fused experts'* ``target_parameters`` (rank and alpha doubled for ``gate_up_proj``), and a regex is first
  reduced to the leaf names it matches (so ``model\\.layers\\.0\\.self_attn\\.q_proj`` turns into every ``q_proj``).
  A file naming the dense or shared-expert ``gate_proj`` that way loads in PEFT with extra, untrained expert
  adapters and other logits. So on an MoE model:

  - adapted linear layers with one of those names go into ``target_parameters`` as ``<path>.weight`` (PEFT then
    wraps the layer's 2-D weight: the same ``W + B A · scale``, under the same ``lora_A`` / ``lora_B`` keys);
  - the other linear layers are listed by full path when short names are ambiguous (never a regex);
  - adapted fused experts are listed by full path (``model.layers.3.mlp.experts.gate_up_proj``).
"""

from __future__ import annotations

import re

from torch import nn

from ..models.moe import find_experts

# The v4 projection names PEFT maps onto transformers 5's fused experts (peft.utils.transformers_weight_conversion).
PEFT_MOE_RENAMED = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def module_names_of(model: nn.Module) -> list[str]:
    """The model's module names as PEFT sees the plain model: our wrappers' inner modules left out."""
    return [n for n, _ in model.named_modules() if n and ".base_layer" not in n and ".lora_" not in n]


def lora_targets(model: nn.Module, linear_names: list[str], expert_parameters: list[str]) -> dict[str, object]:
    """``{"target_modules": ..., "target_parameters": ...}`` under which PEFT adapts exactly ``linear_names`` (module
    paths) and ``expert_parameters`` (``<experts path>.<parameter>`` paths) of ``model``."""
    moe = bool(expert_parameters) or bool(find_experts(model))
    renamed = [n for n in linear_names if moe and n.rsplit(".", 1)[-1] in PEFT_MOE_RENAMED]
    modules = [n for n in linear_names if n not in renamed]
    parameters = sorted(expert_parameters) + sorted(f"{n}.weight" for n in renamed)
    return {"target_modules": module_targets(model, modules, regex_allowed=not moe),
            "target_parameters": parameters or None}


def module_targets(model: nn.Module, names: list[str], regex_allowed: bool = True) -> list[str] | str:
    """Short names if they select exactly ``names`` among all of the model's modules; else a regex (dense models,
    where PEFT matches it as written) or the full paths (MoE models, where PEFT would reduce a regex to leaves)."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    matched = {n for n in module_names_of(model) if n.rsplit(".", 1)[-1] in short}
    if matched == set(names):
        return short
    if regex_allowed:
        return "|".join(re.escape(n) for n in sorted(names))
    return sorted(names)


def select_parameters(model: nn.Module, targets: list[str]) -> list[str]:
    """``<module>.<parameter>`` paths of ``model`` that PEFT's ``target_parameters`` rule selects: equal to an entry,
    or ending with ``.<entry>``."""
    found = []
    for module_name in module_names_of(model):
        module = model.get_submodule(module_name)
        for param_name in module._parameters:
            key = f"{module_name}.{param_name}"
            if any(key == t or key.endswith("." + t) for t in targets):
                found.append(key)
    return found
