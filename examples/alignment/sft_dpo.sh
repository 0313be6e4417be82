#!/usr/bin/env bash
# SFT -> DPO on the bundled date-normalisation demo (numbers: bench/results/alignment.md).
# The SFT adapter is merged into a model directory, and DPO trains a fresh LoRA adapter on top of it: with the
# adapter disabled the DPO reference is then exactly the SFT model. Scale the variables up on a GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-runs/alignment}      # every stage writes here
SFT_STEPS=${SFT_STEPS:-20}         # LoRA SFT steps (batch 8) on the demo's 400 records; 0: DPO on the base model
DPO_STEPS=${DPO_STEPS:-20}         # DPO steps (batch 8 pairs)
DPO_BETA=${DPO_BETA:-0.1}
DPO_LR=${DPO_LR:-5e-4}
DPO_RPO_ALPHA=${DPO_RPO_ALPHA:-0}  # > 0 adds the chosen answers' NLL (RPO), which keeps them likely
DPO_OUT=${DPO_OUT:-dpo}
TF=${TF:-tuneforge}                # e.g. TF=".venv/bin/tuneforge"
DATA=examples/alignment/data

[ -f "$DATA/prefs_train.jsonl" ] || python examples/alignment/make_preference_data.py

# 1. SFT (the demo's LoRA settings) and 2. merge: the SFT model as a plain HF directory.
POLICY="$RUNS/sft-merged"
if [ "$SFT_STEPS" = 0 ]; then
  POLICY=smollm2-135m-instruct
elif [ ! -f "$RUNS/sft-merged/config.json" ]; then
  $TF train --method lora --objective sft --max-steps "$SFT_STEPS" --eval-generate false \
      --output "$RUNS/sft" --overwrite true
  $TF merge "$RUNS/sft" --output "$RUNS/sft-merged"
fi

# 3. DPO on the preference pairs; eval_rewards/accuracies on the held-out pairs land in metrics.jsonl.
$TF train --model "$POLICY" --method lora --objective dpo \
    --data "$DATA/prefs_train.jsonl" --eval-data "$DATA/prefs_eval.jsonl" \
    --dpo-beta "$DPO_BETA" --dpo-rpo-alpha "$DPO_RPO_ALPHA" --dpo-precompute-ref-log-probs true \
    --max-steps "$DPO_STEPS" --batch-size 8 --learning-rate "$DPO_LR" --warmup-steps 2 \
    --output "$RUNS/$DPO_OUT" --overwrite true

# 4. Held-out exact match before (the SFT model, or the base) and after DPO.
$TF eval --model "$POLICY" --data src/tuneforge/assets/demo/eval.jsonl --max-new-tokens 16 --json
$TF eval --model "$POLICY" --adapter "$RUNS/$DPO_OUT" --data src/tuneforge/assets/demo/eval.jsonl \
    --max-new-tokens 16 --json
tail -n 1 "$RUNS/$DPO_OUT/metrics.jsonl"
