"""Build preference pairs and PPO prompts from the bundled date-normalisation demo.

Each demo record (alpaca: ``instruction``, ``input``, ``output`` = the ISO date, ``system``) becomes

* a preference pair ``{prompt, system, chosen, rejected}``: ``chosen`` is the correct ``YYYY-MM-DD`` answer and
  ``rejected`` a plausible wrong one, the kind of mistake a small model makes: day and month swapped
  (``2021-05-03``), a US-style date (``03/05/2021``), a sentence (``The date is 5 March 2021.``), a wrong year
  (``2022-03-05``) or the input echoed back;
* a PPO prompt ``{prompt, system, answer}``; ``answer`` reaches the reward function as a keyword
  (``examples/alignment/rewards.py:date_reward``).

``prompt`` is rendered exactly as the alpaca loader renders ``instruction`` + ``input``
(``"{instruction}\\n\\n{input}"``), so SFT, the reward model, DPO and PPO all see the same prompt tokens. The
train files come from the demo's train split and the held-out files from its eval split (the demo splits share no
calendar date). Mistake kinds are assigned round-robin over a seeded shuffle, so each split is balanced and the
output is a pure function of ``--seed``.

Usage::

    python examples/alignment/make_preference_data.py          # writes examples/alignment/data/*.jsonl
    python examples/alignment/make_preference_data.py --out DIR --seed 0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "tuneforge" / "assets" / "demo"
DEFAULT_OUT = Path(__file__).resolve().parent / "data"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
MISTAKES = ("swapped", "us_style", "sentence", "wrong_year", "echo")


def swapped(date: dt.date, record: dict, rng: random.Random) -> str:
    """Day and month exchanged; when the day is > 12 that is not a valid date, but still the confusion."""
    if date.day == date.month:  # swapping changes nothing: shift the day instead
        return f"{date.year:04d}-{date.month:02d}-{date.day % 28 + 1:02d}"
    return f"{date.year:04d}-{date.day:02d}-{date.month:02d}"


def us_style(date: dt.date, record: dict, rng: random.Random) -> str:
    return f"{date.month:02d}/{date.day:02d}/{date.year:04d}"


def sentence(date: dt.date, record: dict, rng: random.Random) -> str:
    return f"The date is {date.day} {MONTHS[date.month - 1]} {date.year}."


def wrong_year(date: dt.date, record: dict, rng: random.Random) -> str:
    year = date.year + rng.choice([-10, -1, 1, 10])
    day = min(date.day, 28) if (date.month, date.day) == (2, 29) else date.day
    return f"{year:04d}-{date.month:02d}-{day:02d}"


def echo(date: dt.date, record: dict, rng: random.Random) -> str:
    return record["input"]


WRONG = {"swapped": swapped, "us_style": us_style, "sentence": sentence, "wrong_year": wrong_year, "echo": echo}


def prompt_of(record: dict) -> str:
    """The user turn the alpaca loader builds (``tuneforge.data.formats._from_alpaca``)."""
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pairs(records: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    kind_of = {i: MISTAKES[k % len(MISTAKES)] for k, i in enumerate(order)}
    out = []
    for i, record in enumerate(records):
        date = dt.date.fromisoformat(record["output"])
        kind = kind_of[i]
        rejected = WRONG[kind](date, record, rng)
        assert rejected != record["output"]
        out.append({"prompt": prompt_of(record), "system": record["system"], "chosen": record["output"],
                    "rejected": rejected, "mistake": kind})
    return out


def prompts(records: list[dict]) -> list[dict]:
    return [{"prompt": prompt_of(r), "system": r["system"], "answer": r["output"]} for r in records]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=DEMO, help="directory with the demo's train/eval.jsonl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, held_out = read_jsonl(args.demo / "train.jsonl"), read_jsonl(args.demo / "eval.jsonl")
    overlap = {r["output"] for r in train} & {r["output"] for r in held_out}
    if overlap:
        raise SystemExit(f"the demo's splits share dates: {sorted(overlap)[:5]}")
    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        "prefs_train.jsonl": pairs(train, args.seed),
        "prefs_eval.jsonl": pairs(held_out, args.seed + 1),
        "prompts_train.jsonl": prompts(train),
        "prompts_eval.jsonl": prompts(held_out),
    }
    for name, rows in files.items():
        write_jsonl(args.out / name, rows)
        print(f"{args.out / name}: {len(rows)} records")


if __name__ == "__main__":
    main()
