"""The router of a mixture-of-experts model during training: its own load-balancing loss, and which experts work.

transformers' MoE causal LMs add ``router_aux_loss_coef · load_balancing_loss_func(router logits)`` (Switch
Transformer's auxiliary loss, Fedus et al. 2021, eq. 4) to the loss only when called with labels and
``output_router_logits``; tuneforge's objectives compute their loss from the logits, so the trainer adds the same term
itself: ``RouterMonitor`` hooks the modules the model records its router logits from (its ``_can_record_outputs``),
and calls the model's own ``load_balancing_loss_func`` with the model's own coefficient, number of experts and top-k,
over the tokens the forward's attention mask marks real (packed rows carry no mask: their few trailing pad tokens
count too). Models without such a loss (DeepSeek-V3 balances with a bias instead) get none.

It also counts the (token, expert) assignments of each training forward, per expert summed over layers, so a
collapsed router (a few experts taking every token) is visible in the step metrics and the report.
Only forwards that build a graph count (``torch.is_grad_enabled()``): DPO's reference pass and evaluation do not,
nor the blocks gradient checkpointing runs again during backward.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .moe import is_experts_module, router_classes


def _wrapped(model: nn.Module, experts: nn.Module) -> bool:
    return any(getattr(m, "base_layer", None) is experts for m in model.modules())


class RouterMonitor:
    """Hooks on an MoE model's routers and experts (none on a dense model: every method then does nothing)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.num_experts = _first_int(model, "num_experts", "num_local_experts", "n_routed_experts")
        self.top_k = _first_int(model, "num_experts_per_tok")
        self.coef = float(getattr(model, "router_aux_loss_coef", 0.0) or 0.0)
        self.loss_function = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
        self.forwards: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.counts: torch.Tensor | None = None
        self.handles = []
        experts = [m for m in model.modules() if _is_called_experts(model, m)]
        if not experts or self.num_experts is None:
            return
        self.in_forward = False  # gradient checkpointing re-runs blocks during backward: those are not counted
        self.handles.append(model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._end))
        for cls, index in router_classes(model):
            for module in model.modules():
                if type(module) is cls:
                    self.handles.append(module.register_forward_hook(self._router_hook(index)))
        for module in experts:
            self.handles.append(module.register_forward_pre_hook(self._count, with_kwargs=True))

    @property
    def active(self) -> bool:
        return bool(self.handles)

    @property
    def adds_loss(self) -> bool:
        """Whether ``take_loss`` returns the model's balancing loss (a coefficient and the model's loss function)."""
        return self.active and self.coef > 0 and self.loss_function is not None and self.top_k is not None

    # -- hooks --------------------------------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        self.in_forward = torch.is_grad_enabled()
        if self.in_forward:
            self.forwards.append({"mask": kwargs.get("attention_mask"), "logits": []})

    def _end(self, module, args, output):
        self.in_forward = False

    def _router_hook(self, index: int):
        def hook(module, args, output):
            if self.in_forward and self.forwards:
                self.forwards[-1]["logits"].append(output[index] if isinstance(output, tuple) else output)
        return hook

    def _count(self, module, args, kwargs):
        if not self.in_forward:
            return
        # MoE blocks call experts(hidden_states, top_k_index, top_k_weights) positionally (every family here).
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
        if index is None:
            return
        mask = self.forwards[-1]["mask"] if self.forwards else None
        flat = index.reshape(index.shape[0], -1)
        if mask is not None and mask.numel() == flat.shape[0]:
            flat = flat[mask.reshape(-1).bool()]
        counts = torch.bincount(flat.reshape(-1), minlength=self.num_experts)[:self.num_experts].detach()
        self.counts = counts if self.counts is None else self.counts + counts

    # -- what the trainer reads ---------------------------------------------------------------------
    def take_loss(self) -> torch.Tensor | None:
        """``router_aux_loss_coef ·`` the model's balancing loss for the forwards since the last call (their mean),
        or None where the model has none."""
        forwards, self.forwards = self.forwards, []
        loss_function = self.loss_function
        if not self.adds_loss or loss_function is None:
            return None
        losses = [loss_function(tuple(f["logits"]), self.num_experts, self.top_k, f["mask"])
                  for f in forwards if f["logits"]]
        if not losses:
            return None
        aux = torch.stack([torch.as_tensor(x) for x in losses]).mean()
        self.losses.append(float(aux.detach()))
        return self.coef * aux

    def take_metrics(self) -> dict[str, Any]:
        """Step metrics: the balancing loss (unscaled, mean over micro-batches), the (token, expert) assignments per
        expert summed over layers, and the busiest expert's share relative to a uniform router (1 = balanced)."""
        out: dict[str, Any] = {}
        if self.losses:
            out["router_aux_loss"] = sum(self.losses) / len(self.losses)
        if self.counts is not None and int(self.counts.sum()) > 0:
            counts = self.counts.tolist()
            out["expert_tokens"] = counts
            out["expert_load_max"] = max(counts) * len(counts) / sum(counts)
        self.losses, self.counts = [], None
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _is_called_experts(model: nn.Module, module: nn.Module) -> bool:
    """The module an MoE block calls: a fused-experts module, or tuneforge's wrapper around one."""
    inner = getattr(module, "base_layer", None)
    if inner is not None and is_experts_module(inner):
        return True
    return is_experts_module(module) and not _wrapped(model, module)


def _first_int(model: nn.Module, *names: str) -> int | None:
    for source in (model, getattr(model, "config", None)):
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int):
                return value
    return None
