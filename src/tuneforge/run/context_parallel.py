"""Context (sequence) parallelism under torchrun: ``--context-parallel N`` splits every sequence over N ranks.

DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509), written on ``torch.distributed`` collectives. Each rank of a
group of N holds 1/N of every row's tokens; everything but attention treats tokens one by one (embeddings, norms, MLP,
the loss), so it runs on the local tokens alone. Attention needs every token of a row: before it, one all-to-all
trades the local tokens of all heads for all tokens of H/N heads; after it, the reverse all-to-all trades back. The
heads (the query heads; key/value heads are repeated to them first) must divide by N.

* **Load balance (zig-zag).** Causal attention costs more late in the row. Each row is cut into 2N chunks and rank r
  keeps chunks r and 2N-1-r (one early, one late), so every rank does the same work. Positions ids travel with the
  tokens, so rotary embeddings see the true positions.
* **Packed rows.** The segment boundaries are read from the whole row's position ids (every rank of a group holds the
  whole batch before sharding it), so a packed example that crosses a chunk boundary still attends only to itself.
* **Loss and counts.** Labels are shifted before sharding (position t's target is token t+1, which may live on
  another rank), each rank sums the cross-entropy of its own targets and counts them; the trainer's sum over ranks
  and DDP's gradient average then give exactly the single-process loss and gradients.

Groups are consecutive ranks (0..N-1, N..2N-1, ...); the world divided by N is the data-parallel world, whose ranks
draw different examples (``Distributed.data_rank``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

IGNORE_INDEX = -100
DELEGATES = ("sdpa", "flash_attention_2", "flash_attention_3")
STATE_KEYS = ("cp_order", "cp_natural", "cp_mask")


def zigzag_chunks(size: int, index: int) -> tuple[int, int]:
    """The two of ``2 x size`` chunks rank ``index`` of a group keeps: one from the front, its mirror from the back."""
    return index, 2 * size - 1 - index


def check_world(size: int, world_size: int) -> None:
    """The settings that need no model: run before anything loads."""
    if size == 1:
        return
    if world_size == 1:
        raise ConfigError(f"--context-parallel {size} splits sequences over ranks: start the run with torchrun or "
                          f"--nproc-per-node {size}")
    if world_size % size:
        raise ConfigError(f"--context-parallel {size} does not divide the {world_size} ranks (the data-parallel "
                          "world is ranks / context-parallel)")


def check_context_parallel(size: int, world_size: int, model_config: Any, model_class: type | None = None,
                           objective: Any = None, method: Any = None) -> None:
    """Bad settings for ``--context-parallel``, each one line (ConfigError: exit 2). ``objective`` and ``method`` are
    the classes of the run's; ``model_config`` the model's (its heads and attention implementation)."""
    check_world(size, world_size)
    if size == 1:
        return
    config = getattr(model_config, "text_config", model_config)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if model_class is not None and not getattr(model_class, "_supports_attention_backend", False) or not heads:
        name = model_class.__name__ if model_class is not None else config.model_type
        raise ConfigError(f"--context-parallel: {name} does not compute attention through transformers' attention "
                          "interface; its sequences cannot be split over ranks")
    if heads % size:
        raise ConfigError(f"--context-parallel {size}: the model's {heads} attention heads do not divide by {size} "
                          "(Ulysses gives each rank heads / N whole heads)")
    attention = getattr(config, "_attn_implementation", None)
    if attention is not None and attention not in DELEGATES:
        raise ConfigError(f"--context-parallel needs sdpa or flash-attention; the model uses {attention!r} attention")
    if objective is not None and not objective.splits_sequences:
        raise ConfigError(f"--context-parallel: the {objective.name} objective reads whole sequences (pairs, "
                          "rollouts); context parallelism splits next-token objectives (sft, pretrain)")
    if method is not None and method.packing_refusal:
        raise ConfigError(f"--context-parallel: {method.name} cannot split its rows: {method.packing_refusal}")


def check_before_launch(config: Any, nproc: int) -> None:
    """``train --nproc-per-node N --context-parallel M``: the checks above before any worker starts, the model's
    config read from its config.json (no weights)."""
    if config.context_parallel == 1:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.loading import resolve_model_path

    model_config = AutoConfig.from_pretrained(resolve_model_path(config.model),
                                              trust_remote_code=config.trust_remote_code)
    model_class = AutoModelForCausalLM._model_mapping.get(type(model_config), None)
    if model_class is None:
        raise ConfigError(f"--context-parallel: {model_config.model_type} is not a causal language model transformers "
                          "knows")
    check_context_parallel(config.context_parallel, nproc, model_config, model_class, config.objective_class,
                           config.method_class)


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over dim 0 (part j goes to rank j of the group). Exchanging parts is its own inverse,
    so backward is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return exchange(grad, ctx.group), None


def exchange(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()  # the collective reads and writes flat memory: a strided gradient would be scrambled
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x, group=group)
    return out


@dataclass
class Layout:
    """Where the local tokens of the current batch sit in the whole row, for the attention function."""

    order: torch.Tensor  # [L] the row's positions in rank-concatenated order (what the all-to-all gives)
    natural: torch.Tensor  # [L] the inverse permutation: back to the row's order
    mask: torch.Tensor | None  # [rows, 1, L, L] packed segments (True: may attend), None: plain causal


class ContextParallel:
    """One rank's part in its context-parallel group: shards batches, computes the loss, runs Ulysses attention."""

    def __init__(self, size: int, index: int, group=None):
        self.size, self.index, self.group = size, index, group
        self.layout: Layout | None = None  # the current batch's, set by ``loss``
        self.model: nn.Module | None = None  # the model whose attention this serves

    @property
    def active(self) -> bool:
        """Training on a sharded batch: attention and masks are Ulysses'. Evaluation (eval mode) runs whole rows."""
        return self.layout is not None and self.model is not None and self.model.training

    @classmethod
    def join(cls, size: int, rank: int, world_size: int) -> "ContextParallel":
        """Create the groups of ``size`` consecutive ranks (every rank creates every group: a collective) and
        return this rank's."""
        mine = None
        for first in range(0, world_size, size):
            group = dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                mine = group
        return cls(size, rank % size, mine)

    # -- data ---------------------------------------------------------------------------------------------------
    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's tokens of a collated next-token batch (packed or right-padded): ``input_ids``,
        ``position_ids``, ``targets`` (the shifted labels), ``real`` (not padding), and the layout of the row."""
        ids, labels = batch["input_ids"], batch["labels"]
        rows, length = ids.shape
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(length).expand(rows, length)
        real = batch["example_ids"] >= 0 if "example_ids" in batch else batch["attention_mask"].bool()
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        segments = torch.cumsum(positions == 0, dim=1)  # a new example (or a packed row's padding) restarts at 0
        pad = (-length) % (2 * self.size)  # equal chunks: padding at the end, seen by nobody, predicting nothing
        ids, positions, targets, real, segments = (
            F.pad(t, (0, pad), value=v) for t, v in ((ids, 0), (positions, 0), (targets, IGNORE_INDEX),
                                                     (real, False), (segments, 0)))
        if pad:  # the end padding joins the last segment: it keeps one-segment rows mask-free (plain causal)
            segments[:, length:] = segments[:, length - 1:length]
        chunk = (length + pad) // (2 * self.size)
        order = torch.cat([self.local_index(i, chunk) for i in range(self.size)])
        mine = self.local_index(self.index, chunk)
        packed = bool((segments != segments[:, :1]).any())
        mask = None
        if packed:
            causal = torch.ones(length + pad, length + pad, dtype=torch.bool).tril()
            mask = (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]
        return {"input_ids": ids[:, mine], "position_ids": positions[:, mine], "targets": targets[:, mine],
                "real": real[:, mine], "cp_order": order, "cp_natural": torch.argsort(order), "cp_mask": mask}

    def local_index(self, index: int, chunk: int) -> torch.Tensor:
        return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in zigzag_chunks(self.size, index)])

    @staticmethod
    def units(local: dict[str, Any]) -> int:
        return int((local["targets"] != IGNORE_INDEX).sum())

    @staticmethod
    def tokens(local: dict[str, Any]) -> int:
        return int(local["real"].sum())

    # -- loss -----------------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, local: dict[str, Any], ctx: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Summed cross-entropy of this rank's targets (the trainer sums over ranks and divides by all targets)."""
        from ..models.linear_cross_entropy import linear_cross_entropy_sum
        from ..models.logprobs import accepts_logits_mask, fusable_head

        self.layout = Layout(local["cp_order"], local["cp_natural"], local["cp_mask"])
        targets = local["targets"]
        keep = targets != IGNORE_INDEX
        inputs = {"input_ids": local["input_ids"], "position_ids": local["position_ids"]}
        head = fusable_head(model, targets)
        if head is not None:
            out = model(**inputs, output_hidden_states=True, logits_to_keep=torch.zeros_like(keep))
            loss = linear_cross_entropy_sum(out.hidden_states[-1][keep], head.weight, head.bias, targets[keep])
        else:
            mask_ok = accepts_logits_mask(model)
            logits = model(**inputs, **({"logits_to_keep": keep} if mask_ok else {})).logits
            logits = logits if logits.dim() == 2 else logits[keep]
            loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, {"loss": loss.detach()}

    # -- attention ------------------------------------------------------------------------------------------------
    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, H, local, d]`` -> ``[rows, H/N, L, d]``: all tokens of this rank's share of the heads, in the
        row's own order."""
        rows, heads, local, dim = x.shape
        parts = x.reshape(rows, self.size, heads // self.size, local, dim).transpose(0, 1)
        gathered = AllToAll.apply(parts.contiguous(), self.group)  # [N source ranks, rows, H/N, local, d]
        whole = gathered.permute(1, 2, 0, 3, 4).reshape(rows, heads // self.size, self.size * local, dim)
        return whole.index_select(2, self.layout.natural)

    def sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: ``[rows, H/N, L, d]`` -> ``[rows, H, local, d]``."""
        rows, share, length, dim = x.shape
        local = length // self.size
        parts = x.index_select(2, self.layout.order).reshape(rows, share, self.size, local, dim).permute(2, 0, 1, 3, 4)
        back = AllToAll.apply(parts.contiguous(), self.group)  # [N head groups, rows, H/N, local, d]
        return back.transpose(0, 1).reshape(rows, share * self.size, local, dim)

    def attention(self, module: nn.Module, query, key, value, dropout: float, scaling: float | None):
        from transformers.integrations.sdpa_attention import repeat_kv

        groups = getattr(module, "num_key_value_groups", 1)
        q, k, v = (self.heads_to_sequence(t) for t in (query, repeat_kv(key, groups), repeat_kv(value, groups)))
        mask = self.layout.mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                             scale=scaling)
        return self.sequence_to_heads(out)


def ulysses_attention_function(context: ContextParallel, delegate: str):
    """transformers' attention-function signature: Ulysses while the module trains on a sharded batch, the model's
    own implementation otherwise (evaluation and generation run on whole rows, each rank alone)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs):
        if not context.active:
            return ALL_ATTENTION_FUNCTIONS[delegate](module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, **kwargs)
        return context.attention(module, query, key, value, dropout, scaling).transpose(1, 2).contiguous(), None

    return attention


def ulysses_mask_function(context: ContextParallel, delegate: str):
    """The mask builder for the same name: none while sharded (the layout holds the whole row's), else the
    delegate's."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    build = ALL_MASK_ATTENTION_FUNCTIONS[delegate]

    def mask(*args, **kwargs):
        return None if context.active else build(*args, **kwargs)

    return mask


def use_context_parallel(model: nn.Module, context: ContextParallel) -> str:
    """Switch ``model``'s attention to Ulysses over ``context``'s group; returns the implementation's name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    delegate = model.config._attn_implementation
    name = f"ulysses:{delegate}:{context.size}"
    AttentionInterface.register(name, ulysses_attention_function(context, delegate))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ulysses_mask_function(context, delegate))
    context.model = model
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name
    return name


def setup(size: int, distributed, model: nn.Module, objective: Any, method: Any) -> ContextParallel | None:
    """``--context-parallel size`` for this rank: checked, groups joined, the model's attention switched; None
    for 1. ``distributed``: the trainer's ``Distributed`` (its data-parallel world shrinks to world / size)."""
    if size == 1:
        return None
    check_context_parallel(size, distributed.world_size, model.config, type(model), type(objective), method)
    context = ContextParallel.join(size, distributed.rank, distributed.world_size)
    distributed.context_parallel = size
    use_context_parallel(model, context)
    return context
