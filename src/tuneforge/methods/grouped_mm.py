"""One matrix product per expert, for all experts at once: rows sorted by expert times a stack of expert matrices.

``Groups`` sorts the (token, expert) pairs of a mixture-of-experts layer by expert once per forward; ``grouped_mm``
then computes ``x[rows of e] @ w[e]`` for every expert e in one call: ``torch.nn.functional.grouped_mm`` (or
``torch._grouped_mm``) on CUDA where the dtype and strides allow it, else one padded ``torch.bmm`` (every expert's
rows copied into a ``[experts, most rows, in]`` buffer; on CPU this beats torch's grouped kernel by ~15x).
Neither loops over experts in Python, so the cost does not grow with the number of experts the way transformers'
eager loop (and PEFT's per-forward ΔW over every expert) does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# (device type, dtype) pairs on which torch's grouped kernel refused once: the padded bmm from then on.
_REFUSED: set[tuple[str, torch.dtype]] = set()


@dataclasses.dataclass
class Groups:
    """The routing of one forward, sorted by expert: which pair goes where, and how many rows each expert has."""

    order: torch.Tensor
    """Positions in the flat ``[tokens * top_k]`` routing of the pairs, sorted by expert (stable)."""
    experts: torch.Tensor
    """The expert of each sorted pair."""
    counts: torch.Tensor
    """Rows per expert, ``[num_experts]``."""
    offsets: torch.Tensor
    """Cumulative ``counts`` (int32): the end row of each expert's group, as ``grouped_mm`` takes them."""
    slot: torch.Tensor
    """Each sorted pair's row within its expert's group (for the padded fallback)."""
    _padded: tuple[torch.Tensor, torch.Tensor] | None = dataclasses.field(default=None, repr=False)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s rows as ``[experts, most rows, in]``, zero-padded; kept for the next product of the same ``x``
        (the base weight and LoRA's A read the same input)."""
        if self._padded is None or self._padded[0] is not x:
            capacity = max(int(self.counts.max()) if self.counts.numel() else 0, 1)
            buffer = x.new_zeros(self.counts.shape[0], capacity, x.shape[-1])
            self._padded = (x, buffer.index_put((self.experts, self.slot), x))
        return self._padded[1]

    @classmethod
    def of(cls, top_k_index: torch.Tensor, num_experts: int) -> "Groups":
        flat = top_k_index.reshape(-1)
        experts, order = torch.sort(flat, stable=True)
        counts = torch.bincount(experts, minlength=num_experts)
        ends = torch.cumsum(counts, 0)
        slot = torch.arange(experts.numel(), device=flat.device) - (ends - counts)[experts]
        return cls(order=order, experts=experts, counts=counts, offsets=ends.to(torch.int32), slot=slot)


class _ContiguousGrad(torch.autograd.Function):
    """Identity on the kernel's output whose backward hands the kernel a contiguous gradient: its backward refuses
    the broadcast (stride-0) gradients that e.g. ``.sum()`` produces."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.contiguous()


def _kernel_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    if _GROUPED_MM is None or (x.device.type, x.dtype) in _REFUSED or x.dtype != w.dtype:
        return False
    # CUDA only: torch 2.13's CPU kernel took 3.2 s where one padded bmm took 0.21 s (2048 rows, 64 experts,
    # 256 -> 512, float32, 2 threads); grouped_mm on Ampere and newer.
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    size = x.element_size()
    # The kernel reads with 16-byte vector loads: every non-unit stride, the output's rows and the base pointers
    # must be 16-byte aligned (a rank-4 bf16 factor is not; it takes the bmm, the base weights keep the kernel).
    strides = [st for t in (x, w) for st in t.stride() if st != 1] + [w.shape[-1]]
    return all(st * size % 16 == 0 for st in strides) and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, groups: Groups) -> torch.Tensor:
    """``[S, in]`` rows sorted by expert times ``w: [E, in, out]`` -> ``[S, out]``, row i through ``w[expert_i]``."""
    kernel = _GROUPED_MM
    if kernel is not None and _kernel_fits(x, w):
        try:
            return _ContiguousGrad.apply(kernel(x.contiguous(), w, offs=groups.offsets))
        except (RuntimeError, NotImplementedError):  # e.g. a dtype this build's kernel lacks: remember, fall back
            _REFUSED.add((x.device.type, x.dtype))
    return padded_bmm(x, w, groups)


def padded_bmm(x: torch.Tensor, w: torch.Tensor, groups: Groups) -> torch.Tensor:
    """The same product as one ``torch.bmm``: each expert's rows padded to the largest group."""
    return torch.bmm(groups.padded(x), w)[groups.experts, groups.slot]
