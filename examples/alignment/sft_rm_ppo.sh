#!/usr/bin/env bash
# SFT -> reward model -> PPO on the bundled date-normalisation demo (numbers: bench/results/alignment.md).
# The SFT adapter is merged into a model directory; the reward model and the PPO policy each train a fresh LoRA
# adapter on top of it, so PPO's reference (adapter disabled) is exactly the SFT model.
# REWARD=function uses the verifiable examples/alignment/rewards.py:date_reward instead of the reward model.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-runs/alignment}
SFT_STEPS=${SFT_STEPS:-20}         # LoRA SFT steps (batch 8)
RM_STEPS=${RM_STEPS:-20}           # reward-model steps (batch 8 pairs)
PPO_STEPS=${PPO_STEPS:-16}         # PPO optimiser steps: PPO_STEPS / PPO_EPOCHS rollouts of PPO_BATCH prompts
PPO_BATCH=${PPO_BATCH:-8}
PPO_EPOCHS=${PPO_EPOCHS:-2}
PPO_LR=${PPO_LR:-1e-4}
REWARD=${REWARD:-model}            # model | function
TF=${TF:-tuneforge}
DATA=examples/alignment/data

[ -f "$DATA/prefs_train.jsonl" ] || python examples/alignment/make_preference_data.py

# 1. SFT and 2. merge.
if [ ! -f "$RUNS/sft-merged/config.json" ]; then
  $TF train --method lora --objective sft --max-steps "$SFT_STEPS" --eval-generate false \
      --output "$RUNS/sft" --overwrite true
  $TF merge "$RUNS/sft" --output "$RUNS/sft-merged"
fi

# 3. Reward model: LoRA + a scalar head on the SFT model; held-out pair accuracy lands in metrics.jsonl.
if [ "$REWARD" = model ]; then
  $TF train --model "$RUNS/sft-merged" --method lora --objective reward \
      --data "$DATA/prefs_train.jsonl" --eval-data "$DATA/prefs_eval.jsonl" \
      --max-steps "$RM_STEPS" --batch-size 8 --learning-rate 5e-4 --warmup-steps 2 \
      --output "$RUNS/rm" --overwrite true
  tail -n 1 "$RUNS/rm/metrics.jsonl"
  SOURCE=(--ppo-reward-model "$RUNS/rm")
else
  SOURCE=(--ppo-reward-function examples/alignment/rewards.py:date_reward)
fi

# 4. PPO from the SFT model; `reward` per rollout and eval_reward (greedy, held-out prompts) in metrics.jsonl.
$TF train --model "$RUNS/sft-merged" --method lora --objective ppo "${SOURCE[@]}" \
    --data "$DATA/prompts_train.jsonl" --eval-data "$DATA/prompts_eval.jsonl" \
    --ppo-max-new-tokens 12 --ppo-num-ppo-epochs "$PPO_EPOCHS" --ppo-kl-coef 0.05 \
    --max-steps "$PPO_STEPS" --batch-size "$PPO_BATCH" --learning-rate "$PPO_LR" --warmup-steps 0 \
    --output "$RUNS/ppo-$REWARD" --overwrite true
cat "$RUNS/ppo-$REWARD/metrics.jsonl"
