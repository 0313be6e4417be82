#!/usr/bin/env bash
# Weak SFT -> GRPO on the verifiable date reward, on the bundled date-normalisation demo
# (numbers: bench/results/alignment.md). A few SFT steps leave the model often wrong, so the sampled groups
# disagree and GRPO has a signal; the SFT adapter is merged, and GRPO trains a fresh LoRA adapter on top of it,
# so its reference (adapter disabled) is exactly the SFT model. Scale the variables up on a GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-runs/weak-sft}        # shared with the weak-SFT PPO recipe (sft_rm_ppo.sh with SFT_STEPS=4)
SFT_STEPS=${SFT_STEPS:-4}          # LoRA SFT steps (batch 8): a weak start; 20 reaches ~97% exact match already
GRPO_STEPS=${GRPO_STEPS:-24}       # optimiser steps, one rollout each
GRPO_PROMPTS=${GRPO_PROMPTS:-4}    # prompts per rollout (batch size)
GRPO_G=${GRPO_G:-8}                # completions sampled per prompt (the group)
GRPO_LR=${GRPO_LR:-3e-4}
GRPO_BETA=${GRPO_BETA:-0.04}
GRPO_OUT=${GRPO_OUT:-grpo}
TF=${TF:-tuneforge}                # e.g. TF=".venv/bin/tuneforge"
DATA=examples/alignment/data

[ -f "$DATA/prompts_train.jsonl" ] || python examples/alignment/make_preference_data.py

# 1. SFT (the demo's LoRA settings, few steps) and 2. merge: the weak SFT model as a plain HF directory.
if [ ! -f "$RUNS/sft-merged/config.json" ]; then
  $TF train --method lora --objective sft --max-steps "$SFT_STEPS" --eval-generate false \
      --output "$RUNS/sft" --overwrite true
  $TF merge "$RUNS/sft" --output "$RUNS/sft-merged"
fi

# 3. GRPO on the training prompts with the exact-match date reward (1 exact, 0.5 another ISO date, 0 else).
# eval_before_reward / eval_reward in metrics.jsonl: the mean greedy reward on the 64 held-out prompts.
$TF train --model "$RUNS/sft-merged" --method lora --objective grpo \
    --grpo-reward-functions examples/alignment/rewards.py:date_reward \
    --data "$DATA/prompts_train.jsonl" --eval-data "$DATA/prompts_eval.jsonl" \
    --grpo-num-generations "$GRPO_G" --grpo-max-new-tokens 12 --grpo-beta "$GRPO_BETA" \
    --max-steps "$GRPO_STEPS" --batch-size "$GRPO_PROMPTS" --learning-rate "$GRPO_LR" --warmup-steps 0 \
    --output "$RUNS/$GRPO_OUT" --overwrite true

# 4. Held-out exact match before (the weak SFT model) and after GRPO.
$TF eval --model "$RUNS/sft-merged" --data src/tuneforge/assets/demo/eval.jsonl --max-new-tokens 16 --json
$TF eval --model "$RUNS/sft-merged" --adapter "$RUNS/$GRPO_OUT" --data src/tuneforge/assets/demo/eval.jsonl \
    --max-new-tokens 16 --json
tail -n 1 "$RUNS/$GRPO_OUT/metrics.jsonl"
