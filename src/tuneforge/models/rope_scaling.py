"""Context extension by rotary-position scaling: ``--rope-scaling linear|dynamic|yarn --rope-factor F``.

The model's ``config.rope_parameters`` gets transformers' own fields (``rope_type``, ``factor``, and for YaRN the
``original_max_position_embeddings`` it stretches), and every rotary-embedding module is rebuilt from the changed
config, so the frequencies are the ones transformers computes for a model created with that config (checked by
tests/test_rope_scaling.py). The config travels with the run: a full fine-tune's ``config.json`` holds it, and an
adapter's run folder records it in ``tuneforge.yaml``, which ``inference.loading.load_for_inference`` re-applies.

* linear: positions divided by F (Chen et al. 2023, position interpolation); the model reads F x its length.
* dynamic: NTK-aware base scaling that grows only once a sequence passes the trained length (no change below it).
* yarn: interpolation by frequency band plus an attention temperature (Peng et al. 2023, arXiv:2309.00071).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..errors import ConfigError

ROPE_TYPES = ("linear", "dynamic", "yarn")


def text_config(model: nn.Module):
    return getattr(model.config, "text_config", model.config)


def scaled_rope_parameters(config: Any, kind: str, factor: float) -> dict[str, Any]:
    """``config``'s rope parameters with ``kind`` scaling by ``factor``; refuses a model without rotary positions."""
    if kind not in ROPE_TYPES:
        raise ConfigError(f"--rope-scaling must be one of {', '.join(ROPE_TYPES)}, got {kind!r}")
    current = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in current:
        raise ConfigError(f"--rope-scaling: {config.model_type} has no rotary position embedding to scale")
    if current.get("rope_type", "default") != "default":
        raise ConfigError(f"--rope-scaling: the model already uses {current['rope_type']} rope scaling "
                          f"(factor {current.get('factor')}); it is not stacked on another")
    scaled = {**current, "rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        scaled["original_max_position_embeddings"] = config.max_position_embeddings
    return scaled


def apply_rope_scaling(model: nn.Module, kind: str, factor: float) -> int:
    """Set ``kind`` scaling by ``factor`` on ``model``'s config and rebuild its rotary embeddings in place; the
    context it declares (``max_position_embeddings``) grows F-fold for linear and YaRN. Returns the modules rebuilt."""
    config = text_config(model)
    original = config.max_position_embeddings
    config.rope_parameters = scaled_rope_parameters(config, kind, factor)
    if kind in ("linear", "yarn"):  # dynamic keeps the trained length as the point where its scaling starts
        config.max_position_embeddings = int(original * factor)
    return rebuild_rotary_embeddings(model, config)


def rebuild_rotary_embeddings(model: nn.Module, config: Any) -> int:
    """Replace every ``*RotaryEmbedding`` module by a new one built from ``config`` (its inverse frequencies and
    attention scaling are computed in ``__init__``)."""
    rebuilt = 0
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RotaryEmbedding") or not hasattr(module, "inv_freq"):
            continue
        fresh = type(module)(config=config).to(module.inv_freq.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
        rebuilt += 1
    if not rebuilt:
        raise ConfigError(f"--rope-scaling: found no rotary embedding module in {type(model).__name__}")
    return rebuilt


def recorded_rope_scaling(run_dir: str | Path) -> tuple[str, float] | None:
    """``(rope_scaling, rope_factor)`` a run folder's ``tuneforge.yaml`` records, or None."""
    path = Path(run_dir) / "tuneforge.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None  # a broken record is reported by whoever reads the model name from it
    kind = data.get("rope_scaling") if isinstance(data, dict) else None
    return (kind, float(data["rope_factor"])) if kind else None


def apply_recorded_rope_scaling(model: nn.Module, run_dir: str | Path) -> bool:
    """Re-apply the scaling an adapter was trained with (its run folder's record); True when there was one."""
    recorded = recorded_rope_scaling(run_dir)
    if recorded is None or text_config(model).rope_parameters.get("rope_type") == recorded[0]:
        return False
    apply_rope_scaling(model, *recorded)
    return True
