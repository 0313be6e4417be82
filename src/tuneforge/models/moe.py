"""Where a transformers 5 mixture-of-experts model keeps its routed experts.

transformers 5 stores an MoE layer's routed experts as fused 3-D parameters of one module, laid out by
``transformers.integrations.moe.use_experts_implementation`` (attributes ``num_experts``, ``has_gate``,
``is_transposed``, ``has_bias``; parameters ``gate_up_proj`` / ``up_proj`` and ``down_proj``).
"""

from __future__ import annotations

from torch import nn

EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
"""The fused expert weights transformers 5 defines (``up_proj`` for experts without a gate)."""


def is_experts_module(module: nn.Module) -> bool:
    """A fused-experts module that ``LoRAExperts`` can run: transformers' ``use_experts_implementation`` layout."""
    return (hasattr(module, "num_experts") and hasattr(module, "is_transposed") and hasattr(module, "has_gate")
            and any(_fused(module, p) for p in EXPERT_PARAMETERS))


def _fused(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.dim() == 3 and p.shape[0] == module.num_experts


def expert_parameter_names(module: nn.Module) -> list[str]:
    """The module's fused expert weights in declaration order (PEFT's wrapping order)."""
    return [n for n in module._parameters if n in EXPERT_PARAMETERS and _fused(module, n)]


def find_experts(model: nn.Module) -> list[str]:
    """Names of the fused-experts modules of ``model`` (empty for a dense model)."""
    return [n for n, m in model.named_modules() if is_experts_module(m)]


def router_classes(model: nn.Module) -> tuple[tuple[type, int], ...]:
    """(module class, output index) of the router logits, from the model's own ``_can_record_outputs`` (the
    modules transformers records ``router_logits`` from)."""
    found = []
    for module in model.modules():
        recorder = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None and hasattr(recorder, "target_class"):
            found.append((recorder.target_class, recorder.index or 0))
    return tuple(set(found))


def find_routers(model: nn.Module) -> list[str]:
    """Names of the router modules of ``model`` (empty for a dense model)."""
    classes = tuple(cls for cls, _ in router_classes(model))
    return [n for n, m in model.named_modules() if classes and isinstance(m, classes)]
