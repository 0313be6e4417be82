"""Measurements for bench/results/alignment.md.

    # reward-model preference accuracy on held-out pairs: a trained reward run, or a fresh (untrained) head
    python examples/alignment/measure.py rm-accuracy --rm runs/rm --data examples/alignment/data/prefs_eval.jsonl
    python examples/alignment/measure.py rm-accuracy --untrained runs/sft-merged --data ...prefs_eval.jsonl
    # mean date_reward of `tuneforge generate --output` predictions on prompt records
    python examples/alignment/measure.py reward --predictions preds.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rewards import date_reward  # noqa: E402


def rm_accuracy(args) -> dict:
    from tuneforge.data.formats import load_examples
    from tuneforge.data.template import ensure_chat_template
    from tuneforge.models.loading import load_model
    from tuneforge.objectives.reward import RewardHead, RewardModel, hidden_size_of, load_reward_model

    if args.rm:
        rm = load_reward_model(None, args.rm)
    else:
        torch.manual_seed(args.seed)  # the head's N(0, 1/(d+1)) draw, as the trainer's at step 0
        model, tokenizer = load_model(args.untrained)
        ensure_chat_template(tokenizer)
        rm = RewardModel(model.eval().requires_grad_(False), RewardHead(hidden_size_of(model)).eval(), tokenizer)
    examples = load_examples(args.data)
    chosen = rm.score([e.messages for e in examples], [e.chosen for e in examples])
    rejected = rm.score([e.messages for e in examples], [e.rejected for e in examples])
    wins = [c > r for c, r in zip(chosen, rejected)]
    return {"pairs": len(wins), "accuracy": sum(wins) / len(wins),
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(wins)}


def mean_reward(args) -> dict:
    rows = [json.loads(line) for line in Path(args.predictions).read_text().splitlines() if line.strip()]
    scores = date_reward([r["prompt"] for r in rows], [r["prediction"] for r in rows], [r["answer"] for r in rows])
    return {"prompts": len(rows), "mean_reward": sum(scores) / len(scores),
            "exact_match": sum(s == 1.0 for s in scores) / len(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("rm-accuracy")
    who = acc.add_mutually_exclusive_group(required=True)
    who.add_argument("--rm", help="a reward run directory (objective: reward)")
    who.add_argument("--untrained", help="a model to put a freshly initialised reward head on")
    acc.add_argument("--data", required=True)
    acc.add_argument("--seed", type=int, default=0)
    acc.set_defaults(func=rm_accuracy)
    rew = sub.add_parser("reward")
    rew.add_argument("--predictions", required=True)
    rew.set_defaults(func=mean_reward)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(args.func(args)))


if __name__ == "__main__":
    main()
