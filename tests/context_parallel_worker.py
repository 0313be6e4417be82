"""Run under torchrun (2 gloo ranks) by tests/test_context_parallel.py; not a test module itself.

For each case (Llama with grouped-query attention and Qwen2; packed rows whose examples cross the ranks' chunk
boundaries, and right-padded rows; full fine-tuning and LoRA; LoRA with gradient checkpointing and a tiled MLP), both
ranks build the same tiny model and batch, compute the single-process loss, gradients and logits on a copy, then the
same through Ulysses over the 2 ranks, and rank 0 writes the largest differences to the JSON file named on the command
line."""

import copy
import json
import sys

import torch
import torch.distributed as dist

import tuneforge
from tuneforge.run.context_parallel import ContextParallel, use_context_parallel
from tuneforge.models.logprobs import token_cross_entropy_sum
from tuneforge.models.tiled_mlp import tile_mlps
from tuneforge.run.model_setup import checkpoint_blocks

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import make_tiny_model  # noqa: E402

VOCAB = 320


def packed_batch() -> dict:
    """Two rows of 30 tokens; examples of 11, 9 and 10 tokens (row 0) and 17 + 13 (row 1): with 2 ranks the row is
    padded to 32 and cut into chunks of 8, so examples straddle chunks held by different ranks."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (2, 30), generator=g)
    positions = torch.cat([torch.cat([torch.arange(n) for n in lengths])[None] for lengths in ([11, 9, 10], [17, 13])])
    labels = ids.clone()
    labels[positions == 0] = -100  # an example's first token is never predicted (as data.packing does)
    labels[1, 3:6] = -100  # a prompt
    example_ids = torch.cumsum(positions == 0, dim=1) - 1
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "example_ids": example_ids,
            "num_examples": 5}


def padded_batch() -> dict:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(4, VOCAB, (2, 27), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def reference(model, batch):
    model.zero_grad(set_to_none=True)
    loss, count = token_cross_entropy_sum(model, batch)
    loss.backward()
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    with torch.no_grad():
        logits = model(**inputs).logits
    return loss.detach(), count, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, logits


def context_parallel(model, context, batch):
    local = context.shard(batch)
    model.zero_grad(set_to_none=True)
    loss, _ = context.loss(model, local)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    total = loss.detach().clone()
    dist.all_reduce(total)
    units = torch.tensor(float(context.units(local)))
    dist.all_reduce(units)
    with torch.no_grad():  # this rank's logits, gathered and put back in the row's order
        mine = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
    parts = [torch.empty_like(mine) for _ in range(context.size)]
    dist.all_gather(parts, mine.contiguous())
    logits = torch.cat(parts, dim=1).index_select(1, local["cp_natural"])
    return total, int(units), grads, logits


def run_case(arch: str, packed: bool, method: str, context: ContextParallel, savers: bool = False) -> dict:
    model = make_tiny_model(arch, VOCAB).train()
    if method == "lora":
        tuneforge.attach(model, tuneforge.LoRAConfig(r=4, init_lora_weights=False))
    else:
        model.requires_grad_(True)
    plain = copy.deepcopy(model)
    use_context_parallel(model, context)
    if savers:  # long-context runs use all three: the block recompute runs Ulysses' attention again in backward
        tile_mlps(model, 2)
        checkpoint_blocks(model)
    batch = packed_batch() if packed else padded_batch()
    loss_a, units_a, grads_a, logits_a = reference(plain, batch)
    loss_b, units_b, grads_b, logits_b = context_parallel(model, context, batch)
    real = (batch["example_ids"] >= 0) if packed else batch["attention_mask"].bool()
    length = logits_a.shape[1]
    return {"loss": [float(loss_a), float(loss_b)], "units": [units_a, units_b],
            "grad_names": sorted(grads_a) == sorted(grads_b),
            "grad_max_diff": max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a),
            "grad_max": max(float(g.abs().max()) for g in grads_a.values()),
            "logit_max_diff": float((logits_a - logits_b[:, :length])[real].abs().max())}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    context = ContextParallel.join(2, dist.get_rank(), dist.get_world_size())
    results = {}
    for arch in ("llama", "qwen2"):
        for packed in (True, False):
            for method in ("full", "lora"):
                results[f"{arch}-{'packed' if packed else 'padded'}-{method}"] = run_case(arch, packed, method,
                                                                                           context)
    results["llama-packed-lora-checkpointed-tiled"] = run_case("llama", True, "lora", context, savers=True)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
