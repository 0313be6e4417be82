"""Generate the bundled demonstration data set for ``tuneforge train`` (no arguments).

Task: date normalisation.  Each record gives a calendar date written the way people write it and
asks for the same date in ISO 8601 form (``YYYY-MM-DD``)::

    "March 5, 2021"       -> "2021-03-05"
    "5 March 2021"        -> "2021-03-05"
    "5th of March 2021"   -> "2021-03-05"
    "Mar 5, 2021"         -> "2021-03-05"

Every input names its month with a word (full or three-letter abbreviation), so there is exactly one
correct answer and exact match of the stripped generation against ``output`` is unambiguous.

Why this task: SmolLM2-135M-Instruct does not produce the canonical form zero-shot (0/64 exact match
measured: it echoes the date back or talks about the "YYYY-MM-DD" format), yet the mapping is
deterministic and short (10 answer tokens: the tokenizer splits digits one by one), so a few dozen
LoRA steps on a 2-core CPU teach it (>90% after 10 steps, ~98% after 50).  ``bench/demo_calibration.md``
records the measured before/after exact match, the recommended settings and timings.

Records are alpaca-style: ``{"instruction", "input", "output", "system"}``.  A short system message
replaces the chat template's ~20-token default one, keeping each rendered example at ~50 tokens.

Splits are disjoint by *date*: no calendar date in ``eval.jsonl`` appears in ``train.jsonl`` in any
format.  Formats are assigned round-robin so both splits are balanced across them.  The output is a
pure function of ``--seed`` (default 0); rerunning rewrites byte-identical files.

Usage::

    python examples/make_demo_data.py            # writes src/tuneforge/assets/demo/{train,eval}.jsonl
    python examples/make_demo_data.py --out DIR --n-train 400 --n-eval 64 --seed 0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

SYSTEM = "Answer briefly."
INSTRUCTION = "Write this date as YYYY-MM-DD."

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip

FIRST_DAY = dt.date(1950, 1, 1)
LAST_DAY = dt.date(2039, 12, 31)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "tuneforge" / "assets" / "demo"


def ordinal(n: int) -> str:
    if 11 <= n % 100 <= 13:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def render(date: dt.date, fmt: int) -> str:
    month = MONTHS[date.month - 1]
    if fmt == 0:
        return f"{month} {date.day}, {date.year}"
    if fmt == 1:
        return f"{date.day} {month} {date.year}"
    if fmt == 2:
        return f"{ordinal(date.day)} of {month} {date.year}"
    if fmt == 3:
        return f"{month[:3]} {date.day}, {date.year}"
    raise ValueError(fmt)


N_FORMATS = 4


def record(date: dt.date, fmt: int) -> dict:
    return {
        "instruction": INSTRUCTION,
        "input": render(date, fmt),
        "output": date.isoformat(),
        "system": SYSTEM,
    }


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    span = (LAST_DAY - FIRST_DAY).days + 1
    offsets = rng.sample(range(span), n_train + n_eval)  # distinct dates -> disjoint splits
    dates = [FIRST_DAY + dt.timedelta(days=o) for o in offsets]
    eval_dates, train_dates = dates[:n_eval], dates[n_eval:]
    train = [record(d, i % N_FORMATS) for i, d in enumerate(train_dates)]
    evals = [record(d, i % N_FORMATS) for i, d in enumerate(eval_dates)]
    rng.shuffle(train)
    assert not {r["output"] for r in train} & {r["output"] for r in evals}
    return train, evals


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, evals = make_splits(args.n_train, args.n_eval, args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval records to {args.out}")


if __name__ == "__main__":
    main()
