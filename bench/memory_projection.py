"""Project per-GPU training memory on 8 x H100 80GB with FSDP2 from tuneforge's memory model
(``tuneforge.choose.recommend.memory_breakdown``: parameters, gradients, optimiser, reference, all-gathered units,
activations, logits), for full fine-tuning of a Llama-3.1-8B-shaped model and QLoRA r=16 of a Llama-3.1-70B-shaped
one, and the Llama-3.2-1B-shaped runs ``bench/gpu_fsdp.py`` measures (one-rank FSDP vs single device), so a GPU run
checks the same arithmetic. Shapes are the published configs, built on the meta device: nothing is downloaded.

Writes ``bench/results/memory_projection.md`` and ``.json``. Runs in seconds on a CPU:

    .venv/bin/python bench/memory_projection.py
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

from bench_lora import LLAMA_1B, LLAMA_TINY  # noqa: E402  (one home for the benchmark model shapes)

# meta-llama/Llama-3.1-8B and -70B config.json (the fields that size memory).
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
LLAMA_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
SHAPES = {"llama-3.1-8b": LLAMA_8B, "llama-3.1-70b": LLAMA_70B, "llama-1b": LLAMA_1B, "llama-tiny": LLAMA_TINY}
LORA_OPTIONS = {"r": 16, "lora_alpha": 32}  # QLoRA r=16 on every linear layer
H100_MB = 81559  # an H100 80GB HBM3's memory as CUDA reports it (MiB)
HEADROOM = 0.9  # as recommend: 10% left for the CUDA context, NCCL buffers and allocator fragmentation
PARTS = ("parameters", "gradients", "optimizer", "reference", "gathered", "activations", "logits",
         "freed_in_backward")


@functools.lru_cache(maxsize=None)
def shape(name: str):
    from transformers import LlamaConfig

    from tuneforge.choose.recommend import shape_from_config

    return shape_from_config(LlamaConfig(**SHAPES[name]), name, ("full", "lora", "qlora"),
                             {"lora": LORA_OPTIONS, "qlora": LORA_OPTIONS})


def scenarios() -> list[dict]:
    """Each projected run: the model, method, objective and memory_breakdown's settings (one micro-batch per rank)."""
    rows = []
    for fp32_master in (False, True):
        for checkpointing in (False, True):
            for micro in (1, 2):
                rows.append(dict(model="llama-3.1-8b", method="full", objective="sft", world_size=8, strategy="fsdp",
                                 batch_size=micro, max_length=4096, gradient_checkpointing=checkpointing,
                                 fp32_master=fp32_master))
    for checkpointing in (False, True):
        for micro in (1, 2):
            rows.append(dict(model="llama-3.1-70b", method="qlora", objective="sft", world_size=8, strategy="fsdp",
                             batch_size=micro, max_length=4096, gradient_checkpointing=checkpointing))
    return rows


def gpu_fsdp_scenarios(batch_size: int = 2, max_length: int = 2048) -> list[dict]:
    """The runs bench/gpu_fsdp.py measures (its defaults): continued pretraining, one device, plain or 1-rank FSDP."""
    return [dict(model="llama-1b", method=method, objective="pretrain", world_size=1,
                 strategy="fsdp" if fsdp else None, batch_size=batch_size, max_length=max_length)
            for method in ("full", "lora") for fsdp in (False, True)]


def project(scenario: dict, gpu: bool = True) -> dict[str, float]:
    from tuneforge.choose.recommend import memory_breakdown

    settings = {k: v for k, v in scenario.items() if k not in ("model", "method", "objective")}
    return memory_breakdown(shape(scenario["model"]), scenario["method"], scenario["objective"], gpu=gpu, **settings)


def projected_peak_mb(model: str, method: str, *, gpu: bool, batch_size: int, max_length: int, fsdp: bool) -> float:
    """One device's projected peak for a bench/gpu_fsdp.py run."""
    scenario = dict(model=model, method=method, objective="pretrain", world_size=1,
                    strategy="fsdp" if fsdp else None, batch_size=batch_size, max_length=max_length)
    return sum(project(scenario, gpu).values())


def label(s: dict) -> str:
    where = f"{s['world_size']}x FSDP" if s["strategy"] == "fsdp" else "single device"
    extras = [f"mb {s['batch_size']} x {s['max_length']}"]
    if s.get("gradient_checkpointing"):
        extras.append("act. ckpt")
    if s["method"] == "full":
        extras.append("fp32 master + AdamW" if s.get("fp32_master") else "bf16 + AdamW")
    return f"{s['model']} {s['method']} {s['objective']}, {where}, {', '.join(extras)}"


def table(rows: list[dict], fits_column: bool) -> list[str]:
    head = "| run | " + " | ".join(PARTS) + " | total GiB |" + (" fits 80GB? |" if fits_column else "")
    lines = [head, "|" + "---|" * (len(PARTS) + 2 + fits_column)]
    for row in rows:
        cells = [f"{row['breakdown'].get(p, 0.0) / 1024:.2f}" for p in PARTS]
        fits = (" yes |" if row["fits"] else " **no** |") if fits_column else ""
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | **{row['total_mb'] / 1024:.1f}** |" + fits)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(BENCH / "results" / "memory_projection"),
                        help="path without extension: .md and .json are written")
    args = parser.parse_args(argv)

    def rows_for(scenarios_: list[dict]) -> list[dict]:
        rows = []
        for s in scenarios_:
            parts = project(s)
            total = sum(parts.values())
            rows.append({**s, "label": label(s), "breakdown": {k: round(v, 1) for k, v in parts.items()},
                         "total_mb": round(total, 1), "fits": total <= H100_MB * HEADROOM})
        return rows

    projected, measured_next = rows_for(scenarios()), rows_for(gpu_fsdp_scenarios())
    models = {name: {"params": shape(name).params, "trainable_qlora_r16": shape(name).trainable["qlora"],
                     "root_params": shape(name).root_params, "block_params": shape(name).block_params}
              for name in ("llama-3.1-8b", "llama-3.1-70b", "llama-1b")}
    lines = ["# Per-GPU memory projected for FSDP2 on 8 x H100 80GB", "",
             "From `tuneforge.choose.recommend.memory_breakdown` (written by `bench/memory_projection.py`). GiB per rank at "
             "the training peak; the components sum to the total (`freed_in_backward`: full fine-tuning's gradients "
             "fill while backward frees the activations, so the peak holds the larger of the two). 'Fits' leaves 10% "
             f"of the H100's {H100_MB} MiB for the CUDA context, NCCL buffers and fragmentation.", "",
             "Sharded per rank (1/8): parameters, gradients, AdamW moments (bf16: all in the weights' dtype, "
             "tuneforge's default on a GPU; fp32 master: float32 weights, gradients and moments, bf16 all-gathers "
             "and compute). `gathered`: the root unit (embeddings, head, final norm; 1.05 B parameters in the 8B, "
             "2.1 B in the 70B, kept all-gathered from forward into backward), two decoder blocks and, for full "
             "fine-tuning, the unsharded gradients of the root and one block (bf16) and the block's float32 "
             "reduce-scatter copy. "
             "Activations and logits are per rank's micro-batch and do not shrink with more ranks.", "",
             "| model | parameters | root unit | one block | LoRA r=16 trainable |", "|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {name} | {m['params']:,} | {m['root_params']:,} | {m['block_params']:,} | "
                     f"{m['trainable_qlora_r16']:,} |")
    lines += ["", "## 8 x H100, FSDP2", "", *table(projected, True), "",
              "## Llama-3.2-1B shape, one device: plain vs 1-rank FSDP (what `bench/gpu_fsdp.py` measures)", "",
              "Continued pretraining, packed rows, bf16 weights, one micro-batch per step; `gpu_fsdp.py` writes the "
              "measured peaks beside these projections.", "", *table(measured_next, False), ""]
    Path(args.output + ".md").write_text("\n".join(lines))
    Path(args.output + ".json").write_text(json.dumps({"h100_mb": H100_MB, "headroom": HEADROOM, "models": models,
                                                       "projected": projected, "gpu_fsdp": measured_next},
                                                      indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.output}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
