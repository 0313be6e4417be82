"""LoRA on the routed experts of a mixture-of-experts layer, one low-rank pair per expert.

transformers 5 stores an MoE layer's routed experts as fused 3-D parameters of one module (``experts.gate_up_proj``
``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``; gpt-oss stores them transposed, ``[E, in, out]``, with biases).
They are not ``nn.Linear``, so the module-wrapping LoRA of ``lora.py`` never sees them. ``LoRAExperts`` wraps the
experts module and gives each targeted parameter factors ``A: [E, r, in]`` and ``B: [E, out, r]``: expert e computes
``W_e x + (B_e A_e x) · scale``, the paper's update applied to every expert separately (PEFT's ``target_parameters``).

The forward sorts the (token, expert) pairs by expert once and runs every projection, base and LoRA, as one grouped
matrix product (``grouped_mm.py``): no Python loop over experts and no ΔW materialised. (PEFT instead adds the full
``[E, out, in]`` ΔW to the weight on every forward.)

On disk the factors are PEFT's ``ParamWrapper`` tensors: ``lora_A.weight`` ``[E·r, in]`` (expert-major rows) and
``lora_B.weight`` ``[out, r·E]`` (rank-major columns: column ``k·E + e`` is expert e's k-th), and PEFT nests one
wrapper per targeted parameter, the first-declared innermost, so its keys are ``<experts>.base_layer.lora_A.weight``
(``gate_up_proj``) and ``<experts>.lora_A.weight`` (``down_proj``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..models.moe import expert_parameter_names
from .base import Switchable
from .grouped_mm import Groups, grouped_mm

def in_out(module: nn.Module, parameter: str) -> tuple[int, int]:
    """(in, out) features of one expert's matrix in ``module.<parameter>``."""
    _, a, b = getattr(module, parameter).shape
    return (a, b) if module.is_transposed else (b, a)


class LoRAExperts(nn.Module, Switchable):
    """A fused-experts module with per-expert LoRA on some of its 3-D weights; the original stays as ``base_layer``."""

    def __init__(self, base_layer: nn.Module, parameters: list[str], r: int, alpha: float, use_rslora: bool = False,
                 init: bool | str = True):
        super().__init__()
        self.base_layer = base_layer
        self.parameter_names = [p for p in expert_parameter_names(base_layer) if p in parameters]
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.num_experts = int(base_layer.num_experts)  # type: ignore[arg-type]  # transformers' int attribute
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.parameter_names:
            weight: torch.Tensor = getattr(base_layer, name)
            n_in, n_out = in_out(base_layer, name)
            self.lora_A[name] = nn.Parameter(torch.empty(self.num_experts, r, n_in, device=weight.device,
                                                         dtype=weight.dtype))
            self.lora_B[name] = nn.Parameter(torch.zeros(self.num_experts, n_out, r, device=weight.device,
                                                         dtype=weight.dtype))
        self.reset_lora_parameters(init)
        self.merged = False

    @torch.no_grad()
    def reset_lora_parameters(self, init: bool | str) -> None:
        """PEFT's initialisation of its ``[E·r, in]`` A (Kaiming-uniform with fan-in ``in``, as ``nn.Linear(in, r)``;
        N(0, 1/r) for "gaussian") and zero B (random too for ``init=False``, only for tests)."""
        for name in self.parameter_names:
            a, b = self.lora_A[name], self.lora_B[name]
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(a.view(-1, a.shape[-1]), a=math.sqrt(5))  # a view: fan-in is `in`
            if init is False:
                nn.init.kaiming_uniform_(b.view(-1, b.shape[-1]), a=math.sqrt(5))

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        base: Any = self.base_layer  # transformers' experts module: _apply_gate, act_fn, ... are its own
        if not self.adapter_enabled and self.merged:
            raise RuntimeError("cannot disable merged expert LoRA; unmerge() first")
        if self.merged or not self.adapter_enabled:
            return base(hidden_states, top_k_index, top_k_weights)
        tokens, top_k = top_k_index.shape
        groups = Groups.of(top_k_index, self.num_experts)
        x = hidden_states[groups.order // top_k]
        if base.has_gate:
            h = base._apply_gate(self.project("gate_up_proj", x, groups))
        else:
            h = base.act_fn(self.project("up_proj", x, groups))
        out = self.project("down_proj", h, groups)
        if getattr(base, "has_post_expert_norm", False):
            out = base.post_expert_norm(out)
        out = out * top_k_weights.reshape(-1)[groups.order].unsqueeze(-1).to(out.dtype)
        # Back to token order, then the top-k sum per token (as transformers: deterministic, no index_add_).
        unsorted = torch.empty_like(out).index_copy(0, groups.order, out)
        return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def project(self, name: str, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """One fused projection for the sorted rows: ``W_e x (+ b_e) + B_e A_e x · scale`` for each row's expert."""
        base: Any = self.base_layer
        weight = getattr(base, name)
        w = weight if base.is_transposed else weight.transpose(-2, -1)  # [E, in, out]
        y = grouped_mm(x.to(w.dtype), w, groups)
        if base.has_bias:
            y = y + getattr(base, f"{name}_bias")[groups.experts]
        if name in self.lora_A:
            a, b = self.lora_A[name], self.lora_B[name]
            low = grouped_mm(x.to(a.dtype), a.transpose(-2, -1), groups)  # [S, r]
            y = y + (grouped_mm(low, b.transpose(-2, -1), groups) * self.scaling).to(y.dtype)
        return y

    # -- merge --------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of every expert, ``[E, out, in]`` B A · scale, in the fused parameter's layout, in float32."""
        delta = torch.bmm(self.lora_B[name].float(), self.lora_A[name].float()) * self.scaling
        return delta.transpose(-2, -1) if self.base_layer.is_transposed else delta

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for name in self.parameter_names:
            weight = getattr(self.base_layer, name)
            weight.copy_((weight.float() + self.delta_weight(name)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for name in self.parameter_names:
            weight = getattr(self.base_layer, name)
            weight.copy_((weight.float() - self.delta_weight(name)).to(weight.dtype))
        self.merged = False

    # -- PEFT's tensors -----------------------------------------------------------------------------
    def peft_keys(self, path: str) -> dict[str, str]:
        """``{parameter: key prefix}``: PEFT nests one ParamWrapper per parameter, the first declared innermost."""
        depth = len(self.parameter_names)
        return {name: path + ".base_layer" * (depth - 1 - i) for i, name in enumerate(self.parameter_names)}

    def peft_state(self, path: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, prefix in self.peft_keys(path).items():
            a, b = self.lora_A[name], self.lora_B[name]
            out[f"{prefix}.lora_A.weight"] = a.reshape(-1, a.shape[-1])  # [E·r, in], expert-major
            out[f"{prefix}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1)  # [out, r·E], rank-major
        return out

    @torch.no_grad()
    def load_peft_state(self, path: str, state: dict[str, torch.Tensor]) -> None:
        for name, prefix in self.peft_keys(path).items():
            a, b = self.lora_A[name], self.lora_B[name]
            saved_a, saved_b = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
            expect_a, expect_b = (a.shape[0] * a.shape[1], a.shape[2]), (b.shape[1], b.shape[2] * b.shape[0])
            for key, saved, expect in ((f"{prefix}.lora_A.weight", saved_a, expect_a),
                                       (f"{prefix}.lora_B.weight", saved_b, expect_b)):
                if tuple(saved.shape) != expect:
                    raise ValueError(f"{key}: saved shape {tuple(saved.shape)} != model {expect}")
            a.copy_(saved_a.reshape(a.shape))
            b.copy_(saved_b.reshape(b.shape[1], b.shape[2], b.shape[0]).permute(2, 0, 1))

    def extra_repr(self) -> str:
        return f"parameters={self.parameter_names}, experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}"
