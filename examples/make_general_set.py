"""Generate the built-in general-text set (``src/tuneforge/assets/general/``) that measures forgetting.

Why model-written text: it is licence-clean (the embedded SmolLM2-135M-Instruct is Apache-2.0 and its outputs
carry no third-party copyright), it ships inside the package (no download), and it is, by construction, text the
base model already models well — so a rise in its perplexity after fine-tuning is exactly the general ability the
run gave up (catastrophic forgetting), not noise from text the base never knew.

How: 24 everyday topics x 4 kinds of writing = 96 prompts; each is answered once by the embedded model with
seeded sampling (temperature 0.7, top-p 0.9, 96 new tokens). Every third passage goes to ``eval.jsonl`` (32, the
forgetting measure, ``--general-eval builtin``), the rest to ``train.jsonl`` (64, replay data for mixing,
``--data general:0.2``); the two never share a passage. Rerunning with the same seed and library versions
rewrites the same files (sampling is seeded; CPU float32).

Usage::

    python examples/make_general_set.py          # writes src/tuneforge/assets/general/{train,eval}.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TOPICS = ["cooking a simple dinner", "the water cycle", "how bicycles work", "a walk in the forest",
          "the history of writing", "saving money", "how vaccines train the immune system", "learning a language",
          "the night sky", "a rainy afternoon in a city", "how computers store numbers", "growing tomatoes",
          "the life of bees", "why exercise helps sleep", "ancient Rome", "how a bill becomes a law",
          "ocean tides", "making friends as an adult", "the invention of the printing press", "volcanoes",
          "a train journey", "how to write a good email", "the basics of photosynthesis", "music and memory"]
KINDS = ["Write a short paragraph explaining {}.", "Tell a very short story about {}.",
         "Give three practical tips about {}, as prose.", "Describe {} to a curious ten-year-old."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "src/tuneforge/assets/general"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    from tuneforge.inference.generate import generate
    from tuneforge.models.loading import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    prompts = [kind.format(topic) for topic in TOPICS for kind in KINDS]
    texts = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, do_sample=True,
                     temperature=0.7, top_p=0.9, batch_size=16, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "eval": []}
    for i, text in enumerate(texts):
        splits["eval" if i % 3 == 2 else "train"].append(text)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for text in rows:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} passages to {out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
