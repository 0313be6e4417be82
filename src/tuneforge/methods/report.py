"""``tuneforge methods``: every method's trainable parameters on a given model, side by side."""

from __future__ import annotations

import copy
from typing import Any

from .base import METHODS, available_methods, get_method


def parameter_counts(model, overrides: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Attach each method to a fresh copy of ``model`` and count. ``overrides`` maps method → options."""
    rows = []
    for name in available_methods():
        method = get_method(name)
        options = (overrides or {}).get(name, {})
        try:
            handle = method.attach(copy.deepcopy(model), method.config_class.from_dict(options))
        except Exception as e:  # a method that cannot apply to this architecture says why, the rest still print
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}"})
            continue
        trainable, total = handle.num_trainable_parameters(), handle.num_total_parameters()
        rows.append({"method": name, "trainable": trainable, "total": total, "percent": 100 * trainable / total,
                     "default_lr": method.default_learning_rate})
    return rows


def methods_table(model_name: str | None, flags: dict[str, Any]) -> str:
    from ..models.loading import DEFAULT_MODEL, load_model

    overrides: dict[str, dict[str, Any]] = {}
    for key, value in flags.items():
        routed = METHODS.route(key)  # --prefix-num-virtual-tokens 20 -> prefix_tuning's num_virtual_tokens
        if routed is None:
            raise ValueError(f"unknown option --{key.replace('_', '-')} (method options look like --lora-r 16)")
        method, option = routed
        overrides.setdefault(method.name, {})[option] = value
    model, _ = load_model(model_name or DEFAULT_MODEL, device="cpu", dtype="float32")
    lines = [f"{'method':<16}{'trainable':>14}{'of total':>16}{'%':>10}{'default lr':>12}"]
    for row in parameter_counts(model, overrides):
        if "error" in row:
            lines.append(f"{row['method']:<16}  not applicable: {row['error']}")
        else:
            lines.append(f"{row['method']:<16}{row['trainable']:>14,}{row['total']:>16,}{row['percent']:>10.4f}"
                         f"{row['default_lr']:>12g}")
    return "\n".join(lines)
