"""``tuneforge score``: score (prompt, response) records with a trained reward model.

    tuneforge score --model BASE --reward runs/rm --data answers.jsonl --output scored.jsonl

Each input record comes back with a ``score`` (preference records: ``chosen_score`` and ``rejected_score``).
A record is a prompt with its response in any format tuneforge reads: ``prompt`` + ``response`` (or
``completion``), alpaca ``instruction`` + ``output``, a ``messages`` conversation ending with the assistant's
answer, or a preference pair.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..data.formats import DataError, Example, load_examples

RESPONSE_FIELDS = ("response", "completion")


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("score", help="score (prompt, response) records with a trained reward model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model of the reward run (default: the one its adapter "
                   "config names; not needed for a fully fine-tuned reward model)")
    p.add_argument("--reward", required=True, help="run directory of a reward model (objective: reward)")
    p.add_argument("--data", required=True, help="records to score (jsonl/json/csv/parquet)")
    p.add_argument("--output", required=True, help="where to write the scored records (jsonl)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; default: cuda if available")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bf16 on a GPU that supports it, float32 on CPU")
    p.set_defaults(func=score_command)


def split_record(example: Example) -> tuple[list[dict[str, str]], list[tuple[str, list[dict[str, str]]]]]:
    """The prompt, and the (output key, response) pairs to score in one record."""
    if example.kind == "preference":
        return example.messages, [("chosen_score", example.chosen), ("rejected_score", example.rejected)]
    if example.kind == "chat" and example.messages[-1]["role"] == "assistant":
        return example.messages[:-1], [("score", example.messages[-1:])]
    if example.kind == "prompt":
        for key in RESPONSE_FIELDS:
            value = example.fields.get(key)
            if isinstance(value, str):
                return example.messages, [("score", [{"role": "assistant", "content": value}])]
        raise DataError(f"{example.source}: field 'response' is missing (a prompt needs its response to be scored)")
    raise DataError(f"{example.source}: a {example.kind!r} record has no (prompt, response) to score")


def score_examples(reward_model, examples: list[Example]) -> list[dict[str, Any]]:
    """Each record's fields plus its score(s)."""
    jobs = []  # (record index, output key, prompt, response)
    for i, ex in enumerate(examples):
        prompt, responses = split_record(ex)
        jobs += [(i, key, prompt, response) for key, response in responses]
    scores = reward_model.score([j[2] for j in jobs], [j[3] for j in jobs])
    out = [dict(ex.fields) for ex in examples]
    for (i, key, _, _), s in zip(jobs, scores):
        out[i][key] = s
    return out


def score_command(args: argparse.Namespace) -> int:
    from ..objectives.reward import load_reward_model

    examples = load_examples(args.data)
    reward_model = load_reward_model(args.model, args.reward, device=args.device, dtype=args.dtype,
                                     batch_size=args.batch_size)
    rows = score_examples(reward_model, examples)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"scored {len(rows)} records -> {output}")
    return 0
