"""Tiled MLP: each decoder block's MLP computed over tiles of the sequence, recomputed tile by tile in backward.

Arctic Long Sequence Training (ALST, Bekman et al. 2025, arXiv:2506.13996) observed that at long sequence lengths the
MLP holds the largest activations of a block: ``gate`` and ``up`` projections of ``intermediate_size`` (3-4x the
hidden size) per token, plus the activation and their product, all saved for backward. The MLP treats each token
alone, so it can run on a few tokens at a time: forward without keeping anything but its input, backward recomputing
one tile at a time and propagating its gradient before the next. The peak of the MLP then grows with the tile, not
with the sequence; the price is one more MLP forward per step.

Exactness: every token's output and every gradient are what the untiled MLP computes (sums over tiles in another
order aside), and a dropout inside (LoRA's, GPT-2's) draws the same masks in the recompute: the random state at the
start of the forward is restored before it (as ``torch.utils.checkpoint`` does).

Composes with gradient checkpointing (the block's recompute runs this forward again, which keeps only its input) and
with ``--offload-activations`` (that input is what goes to the CPU).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError

AUTO = "auto"


def tile_count(setting: int | str, seq_len: int, hidden_size: int) -> int:
    """Tiles for a sequence of ``seq_len`` tokens: the number set, or (``auto``) ALST's rule of one tile per
    ``hidden_size`` tokens, where a tile's ``[tokens, intermediate]`` activations are about the size of the
    ``[tokens, hidden]`` states every block already keeps."""
    wanted = math.ceil(seq_len / hidden_size) if setting == AUTO else int(setting)
    return max(1, min(wanted, seq_len))


def tile_bounds(length: int, tiles: int) -> list[tuple[int, int]]:
    """``tiles`` contiguous ``(start, end)`` spans covering ``range(length)``, sizes differing by at most one."""
    edges = [length * i // tiles for i in range(tiles + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class TiledMLPFunction(torch.autograd.Function):
    """``forward(mlp_forward, tiles, x, *params)``: ``mlp_forward`` over ``tiles`` sequence tiles of ``x`` (dim 1),
    nothing saved but ``x``. ``params`` are the MLP's trainable tensors: passed as inputs so that their gradients
    come back through autograd (DDP's hooks, accumulation), not written to ``.grad`` behind its back."""

    @staticmethod
    def forward(ctx, mlp_forward: Callable[[torch.Tensor], torch.Tensor], tiles: int, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp_forward, ctx.tiles = mlp_forward, tiles
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return torch.cat([mlp_forward(x[:, a:b]) for a, b in tile_bounds(x.shape[1], tiles)], dim=1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *params = ctx.saved_tensors
        wants_x = ctx.needs_input_grad[2]
        trained = [i for i, p in enumerate(params) if ctx.needs_input_grad[3 + i]]
        grad_x = torch.empty_like(x) if wants_x else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            _set_rng_state(ctx.rng, x.device)  # the forward's dropout masks again, tile after tile
            for a, b in tile_bounds(x.shape[1], ctx.tiles):
                tile = x[:, a:b].detach().requires_grad_(wants_x)
                with torch.enable_grad():
                    out = ctx.mlp_forward(tile)
                inputs = ([tile] if wants_x else []) + [params[i] for i in trained]
                grads = torch.autograd.grad(out, inputs, grad_out[:, a:b], allow_unused=True)
                if wants_x:
                    grad_x[:, a:b], grads = grads[0], grads[1:]
                for i, g in zip(trained, grads):
                    if g is not None:
                        grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        return (None, None, grad_x, *grad_params)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class TiledForward:
    """Replaces an MLP module's ``forward``: the module, its parameters and state-dict keys stay as they are (LoRA
    wraps its projections afterwards as before; saved files do not change)."""

    def __init__(self, module: nn.Module, setting: int | str, hidden_size: int):
        self.module, self.setting, self.hidden_size = module, setting, hidden_size
        self.original = type(module).forward

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or x.dim() != 3:  # a call this wrapper does not know how to tile: the plain MLP
            return self.original(self.module, x, *args, **kwargs)
        tiles = tile_count(self.setting, x.shape[1], self.hidden_size)
        if tiles == 1 or not torch.is_grad_enabled():  # inference keeps no activations: nothing to save
            return self.original(self.module, x)
        params = [p for p in self.module.parameters() if p.requires_grad]
        return TiledMLPFunction.apply(self._plain, tiles, x, *params)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(self.module, x)
        if not torch.is_tensor(out):
            raise ConfigError(f"--tiled-mlp: {type(self.module).__name__} returns {type(out).__name__}, not one "
                              "tensor (a mixture-of-experts router?); it cannot be tiled")
        return out


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """The MLP of every decoder block (``block.mlp``: Llama, Qwen2, Mistral, Gemma, Phi-3, GPT-2 ...)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    mlps = [getattr(block, "mlp", None) for block in blocks]
    if not blocks or any(not isinstance(m, nn.Module) for m in mlps):
        raise ConfigError(f"--tiled-mlp: {type(model).__name__} has no per-block `mlp` module to tile; run without "
                          "--tiled-mlp")
    return mlps


def hidden_size(model: nn.Module) -> int:
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "hidden_size", None) or config.n_embd


def tile_mlps(model: nn.Module, setting: int | str) -> int:
    """Make every decoder block's MLP compute in sequence tiles (``setting``: a count or ``auto``); returns how many
    MLPs were tiled. Idempotent."""
    check_setting(setting)
    width = hidden_size(model)
    mlps = mlp_modules(model)
    for mlp in mlps:
        if not isinstance(mlp.__dict__.get("forward"), TiledForward):
            mlp.forward = TiledForward(mlp, setting, width)
    return len(mlps)


def untile_mlps(model: nn.Module) -> None:
    """Give every tiled MLP its own forward back."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), TiledForward):
            del module.forward


def check_setting(setting: int | str | None) -> None:
    """``--tiled-mlp``: a positive tile count or ``auto``."""
    if setting is None or setting == AUTO:
        return
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"--tiled-mlp takes a number of tiles (>= 1) or auto, got {setting!r}")
