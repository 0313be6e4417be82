"""LoRA on mixture-of-experts experts: tuneforge's grouped compute vs PEFT's target_parameters, same model, same step.

    python bench/bench_moe_lora.py                         # CPU: a tiny-but-wide Qwen3-MoE (64 experts, top-8)
    python bench/bench_moe_lora.py --device cuda --dtype bfloat16 --hidden 2048 --moe-intermediate 768 \\
        --experts 128 --top-k 8 --layers 4 --seq-len 2048 --batch-size 4

Both sides adapt the same layers (``q_proj``, ``o_proj`` and every expert's ``gate_up_proj`` / ``down_proj``, rank
``--r``) of one randomly initialised Qwen3-MoE and start from the same adapter: tuneforge attaches and saves it, PEFT
loads that file (``is_trainable=True``). Each timed step is the same loop:

    loss = cross_entropy(model(ids).logits, ids shifted); loss.backward(); AdamW.step(); zero_grad()

The difference is how the adapted experts compute. tuneforge sorts the (token, expert) pairs once and runs base and
LoRA products as grouped matrix products (``torch.nn.functional.grouped_mm`` where it fits, a padded bmm otherwise).
PEFT's ``ParamWrapper`` adds ΔW = B A for every expert (``[E, out, in]``) to the weight through a parametrisation on
each forward, then transformers' own experts code runs on the sum.

The two sides alternate step by step (tuneforge, PEFT, PEFT, tuneforge, ...) so machine noise hits both; step time
is the median over ``--steps`` timed steps after ``--warmup``; on CUDA each step is bracketed by synchronize and the
peak memory of each side is measured in a separate pass. The printed loss difference after the last step checks
that both trained the same network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def build_model(args):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                            moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
                            head_dim=args.hidden // args.heads, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, max_position_embeddings=max(4096, args.seq_len))
    model = AutoModelForCausalLM.from_config(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    model.config.use_cache = False
    if args.base_experts != "default":  # how transformers runs the (PEFT-parametrised) experts
        model.config._experts_implementation = args.base_experts
    return model.train()


def sides(args):
    """(name, model) for tuneforge and PEFT, holding the same adapter (upcast to float32, as both train it)."""
    import peft

    import tuneforge
    from tuneforge.methods.lora import LoRAConfig

    ours = build_model(args)
    handle = tuneforge.attach(ours, LoRAConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["q_proj", "o_proj"],
                                               init_lora_weights="gaussian"))
    with torch.no_grad():  # B = 0 would make both sides compute the base model: start from a visible update
        for name, p in ours.named_parameters():
            if ".lora_B" in name:
                p.normal_(std=0.05)
    for _, p in handle.trainable_parameters():
        p.data = p.data.float()
    with tempfile.TemporaryDirectory() as directory:
        handle.save(directory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(build_model(args), directory, is_trainable=True,
                                                    autocast_adapter_dtype=True)
    return [("tuneforge", ours), ("peft", theirs)]


def train_step(model, optimizer, ids):
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--base-experts", default="default", choices=["default", "eager", "batched_mm", "grouped_mm"],
                        help="transformers' experts implementation under PEFT (default: the model's, grouped_mm)")
    args = parser.parse_args()

    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), device=args.device)
    runs = sides(args)
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for name, m in runs}
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    losses: dict[str, float] = {}
    first: dict[str, float] = {}
    for step in range(args.warmup + args.steps):
        order = runs if step % 2 == 0 else runs[::-1]
        for name, model in order:
            sync(args.device)
            start = time.perf_counter()
            losses[name] = train_step(model, optimizers[name], ids)
            first.setdefault(name, losses[name])
            sync(args.device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)

    memory = {}
    if args.device.startswith("cuda"):
        for name, model in runs:
            torch.cuda.reset_peak_memory_stats()
            train_step(model, optimizers[name], ids)
            memory[name] = torch.cuda.max_memory_allocated() / 2**20

    tokens = args.batch_size * args.seq_len
    print(f"Qwen3-MoE hidden={args.hidden} experts={args.experts} top-{args.top_k} moe_intermediate="
          f"{args.moe_intermediate} layers={args.layers} r={args.r}; {tokens} tokens/step; {args.device} {args.dtype}; "
          f"PEFT's experts run by transformers' {runs[1][1].config._experts_implementation}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in median:
        extra = f"  peak {memory[name]:.0f} MiB" if name in memory else ""
        print(f"  {name:9s} step {median[name] * 1000:8.1f} ms  {tokens / median[name]:9.0f} tok/s  "
              f"last loss {losses[name]:.6f}{extra}")
    print(f"  speed-up tuneforge / PEFT: {median['peft'] / median['tuneforge']:.2f}x  "
          f"(loss difference after {args.warmup + args.steps} steps: {abs(losses['peft'] - losses['tuneforge']):.2e}; "
          f"training moved it by {first['tuneforge'] - losses['tuneforge']:.2e})")


if __name__ == "__main__":
    main()
