#!/usr/bin/env bash
# Every GPU measurement the open performance and scale-out work needs, in one run, most important first, each
# bounded in time so that one that hangs cannot eat the rest (a lent GPU machine gives ~15 minutes in all).
# Results land in bench/results/ (JSON + Markdown); a step that fails is reported and the next one runs.
#
#   bash bench/gpu_checks.sh            # on the GPU machine, from the repository root
#
# The machine needs torch with CUDA, transformers >= 5.23, peft (baseline side) and tuneforge's own dependencies;
# liger-kernel and flash-attn are used when installed (pip install "tuneforge[gpu]").
set -u
cd "$(dirname "$0")/.."
OUT=bench/results
PY=${PYTHON:-python3}
status=0

step() {  # step SECONDS NAME COMMAND...: run it with a time limit, keep going on failure
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# 1. LoRA SFT against PEFT (and liger-kernel over PEFT where installed) on AlpacaEval's real lengths, Llama-1B
#    shape, bf16: issue 13's headline (>= 2x PEFT tokens/s, <= 0.5x memory, >= 40% MFU).
SIDES=tuneforge,peft
$PY -c "import liger_kernel" 2>/dev/null && SIDES=tuneforge,peft,liger
step 300 lora-vs-peft $PY bench/bench_lora.py --device cuda --model llama-1b-random --seq-len 2048 --batch-size 16 \
    --warmup 3 --steps 10 --sides "$SIDES" --json $OUT/gpu_llama1b_alpaca.json --markdown $OUT/gpu_llama1b_alpaca.md

# 2. QLoRA against our LoRA (>= 0.9x its speed at <= 0.5x its memory).
step 150 qlora $PY bench/bench_qlora.py --device cuda --model llama-1b-random --seq-len 2048 --batch-size 4 \
    --steps 10 --json $OUT/gpu_llama1b_qlora.json

# 3. One-rank FSDP2 against one device, full fine-tuning and LoRA, beside the memory model's projection.
step 300 fsdp $PY bench/gpu_fsdp.py

# 4. Long context (issue 26), Llama-3.1-8B shape, random weights, one row per step, checkpointing + offload: the
#    longest context of QLoRA r=32 on this GPU against Unsloth's 342,733 tokens on 80 GB, tokens/s at 32K, and
#    tuneforge's memory model (recommend --max-length auto) beside each measured peak. Each point in its own process.
step 600 long-context $PY bench/bench_long_context.py --device cuda --shape llama-3.1-8b --method qlora --rank 32 \
    --offload --sides tiled --lengths 32768,131072,342733 --output $OUT/gpu_long_context_llama8b_qlora
# 5. The same at 32K without tiling (the MLP's share of the peak, tokens/s with and without recompute).
step 300 long-context-untiled $PY bench/bench_long_context.py --device cuda --shape llama-3.1-8b --method qlora \
    --rank 32 --offload --lengths 32768 --output $OUT/gpu_long_context_llama8b_qlora_32k
# 6. LoRA on MoE experts (issue 27): tuneforge's grouped compute (torch grouped_mm) against PEFT's target_parameters
#    on a Qwen3-MoE-shaped layer stack (128 experts, top-8), bf16; prints the speed-up and both peaks.
step 300 moe-lora $PY bench/bench_moe_lora.py --device cuda --dtype bfloat16 --hidden 2048 --heads 16 \
    --moe-intermediate 768 --experts 128 --top-k 8 --layers 4 --vocab 32000 --r 16 --seq-len 2048 --batch-size 4

exit $status
