"""Prompting vs tuning, measured: hard prompts, prompt tuning and LoRA on one task and one held-out split.

    python bench/prompt_vs_tune.py                  # the embedded SmolLM2-135M-Instruct, the bundled date task
    python bench/prompt_vs_tune.py --steps 60 --eval-limit 64 --json bench/results/prompt_vs_tune.json

Rows, all scored on the same held-out records:

* ``base · data prompt``   the untrained model with the records' own prompt (alpaca ``system`` + ``instruction`` +
  ``input``), the prompt the trained rows also answer at inference;
* ``base · <best> zero-shot``  the hard prompt that wins among ``--templates`` on ``--select-on`` training records
  (chosen on training data, so the held-out split stays unseen);
* ``base · <best> few-shot``  the same prompt with ``--few-shot-k`` solved examples from the training split, the
  most TF-IDF-similar to the query;
* ``prompt tuning``  virtual tokens initialised from the best hard prompt's text (``prompt_tuning_init: TEXT``; as
  many tokens as that text has, or ``--num-virtual-tokens``), trained on the training split;
* ``LoRA``  r=8, alpha=16, all linear layers (the demo's settings), same steps, batches and data.

Exact match, the same function for every row: the greedy generation, stripped, equals the reference after runs of
whitespace become one space (``tuneforge.inference.evaluate.normalise_answer``, what ``tuneforge train`` reports as
``exact_match_after``): case and punctuation count, so "2021-03-05." is wrong. The ``lenient`` column applies
``tuneforge.prompting``'s ``exact`` metric (case-folded, quotes and punctuation at the ends ignored) to the same
outputs, to show how much of a gap is formatting. Inference cost is the mean prompt length per query in tokens as
the model sees it: chat template, system turn, few-shot turns and query, plus the virtual tokens of prompt tuning.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from tuneforge.config import load_config  # noqa: E402
from tuneforge.data.formats import read_rows  # noqa: E402
from tuneforge.data.template import ensure_chat_template, prompt_ids  # noqa: E402
from tuneforge.inference.evaluate import normalise_answer  # noqa: E402
from tuneforge.inference.generate import generate  # noqa: E402
from tuneforge.methods import get_method  # noqa: E402
from tuneforge.prompting import FewShot, PromptTemplate, evaluate_prompts, load_template  # noqa: E402
from tuneforge.prompting.metrics import exact_match as lenient_exact  # noqa: E402
from tuneforge.prompting.template import _PLACEHOLDER  # noqa: E402
from tuneforge.run.trainer import DEMO_DIR, train  # noqa: E402

DEFAULT_TEMPLATES = ["zero_shot", "role_expert", str(ROOT / "examples" / "prompting" / "dates_zero_shot.yaml")]
LORA_OPTIONS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}  # demo.yaml

Loader = Callable[[], tuple[Any, Any]]  # () -> a fresh (model, tokenizer)


def strict_exact(prediction: str, reference: str) -> float:
    """The score of every row: equal after collapsing whitespace (tuneforge train's exact match)."""
    return float(normalise_answer(prediction) == normalise_answer(reference))


def read_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    return [row for _, row in read_rows(path)][:limit]


def data_prompt_template() -> PromptTemplate:
    """The records' own prompt as a template: renders what ``tuneforge train`` builds from an alpaca record."""
    return PromptTemplate(name="data prompt", system="{system?}", instruction="{instruction}\n\n{input?}")


def with_fewshot(template: PromptTemplate, k: int) -> PromptTemplate:
    """``template`` plus ``k`` similar solved examples drawn from the pool the caller passes."""
    return template.model_copy(update={"name": f"{template.label}", "fewshot": FewShot(k=k, strategy="similar")})


def hard_prompt_text(template: PromptTemplate, records: Sequence[dict[str, Any]]) -> str:
    """The fixed text a template adds to every query: its system and instruction with the per-query fields left
    out. Fields equal in every record (the demo's ``instruction``) are task wording, so they stay."""
    constant = {key: records[0][key] for key in records[0]
                if all(r.get(key) == records[0][key] for r in records) and isinstance(records[0][key], str)}

    def fill(text: str) -> str:
        out = _PLACEHOLDER.sub(lambda m: m.group(0)[0] if m.group(1) is None else constant.get(m.group(1), ""), text)
        return re.sub(r"[ \t]*\n\s*", "\n", out).strip(" \n:")

    parts = [fill(t) for t in (template.system, template.instruction) if t]
    return "\n".join(p for p in parts if p)


class CountingGenerate:
    """``evaluate_prompts``'s generate_fn: greedy tuneforge generation that records each prompt's token count."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prompt_tokens: list[int] = []

    def __call__(self, prompts: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        ensure_chat_template(self.tokenizer)
        self.prompt_tokens += [len(prompt_ids(self.tokenizer, p)) for p in prompts]
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=False,
                        batch_size=self.batch_size)


def score_prompt(model, tokenizer, template: PromptTemplate, records, pool, max_new_tokens: int,
                 batch_size: int, virtual_tokens: int = 0) -> dict[str, Any]:
    """Exact match (strict and lenient), prompt and output tokens per query, seconds, for one template."""
    gen = CountingGenerate(model, tokenizer, batch_size)
    start = time.perf_counter()
    [result] = evaluate_prompts(model, tokenizer, [template], records, metric=strict_exact,
                                max_new_tokens=max_new_tokens, generate_fn=gen, pool=pool)
    n = max(result.n, 1)
    lenient = sum(lenient_exact(p["answer"], str(p["reference"])) for p in result.predictions) / n
    similarity = sum(char_similarity(p["answer"], str(p["reference"])) for p in result.predictions) / n
    return {"exact_match": result.score, "exact_match_lenient": lenient, "similarity": similarity, "n": result.n,
            "prompt_tokens": sum(gen.prompt_tokens) / n + virtual_tokens, "virtual_tokens": virtual_tokens,
            "output_tokens": result.mean_output_length, "eval_s": time.perf_counter() - start,
            "samples": [{"reference": p["reference"], "output": p["output"]} for p in result.predictions[:3]]}


def char_similarity(prediction: str, reference: str) -> float:
    """difflib's ratio of the whitespace-normalised strings: partial credit that separates prompts when none
    matches exactly (a small model's usual zero-shot state on a strict format)."""
    return difflib.SequenceMatcher(None, normalise_answer(prediction), normalise_answer(reference)).ratio()


def max_answer_tokens(tokenizer, records) -> int:
    """Generation budget: the longest reference, its stop token, one token to spare. A longer output cannot
    match, so a larger budget changes no score; it only costs time on rows that ramble."""
    return max(len(tokenizer(str(r["output"]), add_special_tokens=False)["input_ids"]) for r in records) + 2


def select_best(model, tokenizer, templates, dev, pool, max_new_tokens, batch_size) -> tuple[PromptTemplate, list]:
    """The template with the best exact match on ``dev`` (ties: lenient match, character similarity, then the
    shorter prompt)."""
    scored = []
    for t in templates:
        s = score_prompt(model, tokenizer, t, dev, pool, max_new_tokens, batch_size)
        scored.append((t, s))
        print(f"  select on {s['n']} training records: {t.label:<20} exact {s['exact_match']:.3f}  "
              f"lenient {s['exact_match_lenient']:.3f}  similarity {s['similarity']:.3f}  "
              f"{s['prompt_tokens']:.0f} prompt tokens", flush=True)
    best = max(scored, key=lambda ts: (ts[1]["exact_match"], ts[1]["exact_match_lenient"], ts[1]["similarity"],
                                        -ts[1]["prompt_tokens"]))
    return best[0], [{"template": t.label, **{k: v for k, v in s.items() if k != "samples"}} for t, s in scored]


def run_training(method: str, options: dict, lr: float | None, load: Loader, train_path, output: Path,
                 steps: int, batch_size: int, max_length: int, seed: int, model_name: str):
    """One ``tuneforge.train`` run on a freshly loaded base; returns (result, seconds in train()). No eval data:
    the rows are scored afterwards by ``score_prompt``, like the untrained ones."""
    model, tokenizer = load()
    overrides = {"model": model_name, "method": method, "method_options": options, "data": str(train_path),
                 "max_steps": steps, "batch_size": batch_size, "max_length": max_length,
                 "warmup_steps": min(5, steps - 1), "lr_scheduler": "cosine", "eval_generate": False,
                 "output": str(output), "overwrite": True, "progress": False, "seed": seed}
    if lr is not None:
        overrides["learning_rate"] = lr
    config = load_config(None, overrides)
    start = time.perf_counter()
    result = train(config, model, tokenizer)
    return result, time.perf_counter() - start


def compare(load: Loader, *, train_path: str | Path, eval_path: str | Path, templates: Sequence[PromptTemplate],
            steps: int = 60, batch_size: int = 8, max_length: int = 96, eval_limit: int | None = 64,
            select_on: int = 16, few_shot_k: int = 3, num_virtual_tokens: int | None = None,
            lora_lr: float = 1e-3, prompt_tuning_lr: float | None = None, max_new_tokens: int | None = None,
            gen_batch_size: int = 16, workdir: str | Path | None = None, model_name: str = "model",
            seed: int = 0, control_init: bool = False) -> dict[str, Any]:
    """Run every row and return ``{"rows": [...], "selection": [...], "init_text": ..., "settings": {...}}``.

    ``control_init`` adds prompt tuning started from sampled vocabulary embeddings (tuneforge's default init), same
    token count: what the hard prompt's text is worth as a starting point."""
    train_records = read_records(train_path)
    eval_records = read_records(eval_path, eval_limit)
    dev = train_records[:select_on]
    rows: list[dict[str, Any]] = []

    def add(method: str, prompt: str, scores: dict, trainable: int = 0, train_s: float = 0.0, wall: float = 0.0,
            **extra):
        row = {"method": method, "prompt": prompt, **scores, "trainable_params": trainable, "train_s": train_s,
               "wall_s": wall, **extra}
        rows.append(row)
        print(f"  {method:<14} {prompt:<34} exact {row['exact_match']:.3f}  ({row['wall_s']:.0f} s)", flush=True)

    start = time.perf_counter()
    model, tokenizer = load()
    budget = max_new_tokens or max_answer_tokens(tokenizer, train_records + eval_records)
    load_s = time.perf_counter() - start
    print(f"base model loaded in {load_s:.1f} s; generation budget {budget} new tokens", flush=True)

    t0 = time.perf_counter()
    s = score_prompt(model, tokenizer, data_prompt_template(), eval_records, train_records, budget, gen_batch_size)
    add("base", "data prompt, zero-shot", s, wall=time.perf_counter() - t0)

    t0 = time.perf_counter()
    best, selection = select_best(model, tokenizer, templates, dev, train_records, budget, gen_batch_size)
    select_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = score_prompt(model, tokenizer, best, eval_records, train_records, budget, gen_batch_size)
    add("base", f"{best.label}, zero-shot", s, wall=time.perf_counter() - t0)
    t0 = time.perf_counter()
    s = score_prompt(model, tokenizer, with_fewshot(best, few_shot_k), eval_records, train_records, budget,
                     gen_batch_size)
    add("base", f"{best.label}, {few_shot_k}-shot", s, wall=time.perf_counter() - t0)

    init_text = hard_prompt_text(best, train_records)
    if not init_text:
        raise ValueError(f"template {best.label} adds no fixed text to initialise prompt tuning from")
    n_virtual = num_virtual_tokens or len(tokenizer(init_text)["input_ids"])  # tokenised as the TEXT init does
    del model

    with tempfile.TemporaryDirectory(prefix="prompt_vs_tune-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        plans = [
            ("prompt tuning", "prompt_tuning", {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": init_text,
                                                "num_virtual_tokens": n_virtual}, prompt_tuning_lr, n_virtual,
             f"data prompt + {n_virtual} virtual (init: {best.label})"),
            ("LoRA", "lora", dict(LORA_OPTIONS), lora_lr, 0, "data prompt"),
        ]
        if control_init:
            plans.insert(1, ("prompt tuning", "prompt_tuning", {"prompt_tuning_init": "SAMPLE_VOCAB",
                                                                "num_virtual_tokens": n_virtual}, prompt_tuning_lr,
                             n_virtual, f"data prompt + {n_virtual} virtual (init: vocab sample)"))
        for label, method, options, lr, virtual, prompt in plans:
            t0 = time.perf_counter()
            run_dir = root / f"{method}-{options.get('prompt_tuning_init', '').lower()}".rstrip("-")
            result, train_s = run_training(method, options, lr, load, train_path, run_dir, steps,
                                           batch_size, max_length, seed, model_name)
            result.model.eval()
            s = score_prompt(result.model, result.tokenizer, data_prompt_template(), eval_records, train_records,
                             budget, gen_batch_size, virtual_tokens=virtual)
            add(label, prompt, s, trainable=int(result.metrics["trainable_params"]), train_s=train_s,
                wall=time.perf_counter() - t0, final_loss=result.final_loss,
                learning_rate=lr if lr is not None else get_method(method).default_learning_rate)
            del result

    return {"rows": rows, "selection": selection, "selected_template": best.label, "init_text": init_text,
            "settings": {"steps": steps, "batch_size": batch_size, "max_length": max_length,
                         "eval_n": len(eval_records), "select_on": len(dev), "few_shot_k": few_shot_k,
                         "num_virtual_tokens": n_virtual,
                         "lora": LORA_OPTIONS, "lora_lr": lora_lr, "prompt_tuning_lr": prompt_tuning_lr,
                         "max_new_tokens": budget, "model": model_name, "seed": seed,
                         "model_load_s": load_s, "select_s": select_s, "threads": torch.get_num_threads()}}


def markdown_table(report: dict[str, Any]) -> str:
    header = ["method", "prompt", "held-out exact match", "lenient", "trainable params", "train s",
              "prompt tokens / query", "output tokens / query", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in report["rows"]:
        cells = [r["method"], r["prompt"], f"{r['exact_match']:.3f} ({round(r['exact_match'] * r['n'])}/{r['n']})",
                 f"{r['exact_match_lenient']:.3f}", f"{r['trainable_params']:,}", f"{r['train_s']:.0f}",
                 f"{r['prompt_tokens']:.1f}", f"{r['output_tokens']:.1f}", f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF directory, .gguf or hub id")
    p.add_argument("--train", default=str(DEMO_DIR / "train.jsonl"), help="labelled training records (alpaca)")
    p.add_argument("--eval", default=str(DEMO_DIR / "eval.jsonl"), help="held-out labelled records (alpaca)")
    p.add_argument("--templates", nargs="+", default=DEFAULT_TEMPLATES, metavar="YAML",
                   help="zero-shot hard-prompt candidates (files or built-in names); the best on --select-on "
                        "training records is the hard-prompt row and the prompt-tuning init")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps of each trained row")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--eval-limit", type=int, default=64, help="score the first N held-out records")
    p.add_argument("--select-on", type=int, default=16, help="training records that choose the best hard prompt")
    p.add_argument("--few-shot-k", type=int, default=3)
    p.add_argument("--num-virtual-tokens", type=int, help="default: the token count of the best hard prompt's text")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="the demo's LoRA learning rate")
    p.add_argument("--prompt-tuning-lr", type=float, help="default: prompt tuning's own (3e-2)")
    p.add_argument("--control-init", action="store_true",
                   help="add prompt tuning from sampled vocabulary embeddings (same token count) as a control")
    p.add_argument("--max-new-tokens", type=int, help="default: longest reference answer + 2")
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the trained adapters here (default: a temporary directory)")
    p.add_argument("--json", help="write the rows, the selection and the settings to this file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from tuneforge.models.loading import load_model

    start = time.perf_counter()
    report = compare(lambda: load_model(args.model, device=args.device), train_path=args.train, eval_path=args.eval,
                     templates=[load_template(t) for t in args.templates], steps=args.steps,
                     batch_size=args.batch_size, max_length=args.max_length, eval_limit=args.eval_limit,
                     select_on=args.select_on, few_shot_k=args.few_shot_k, num_virtual_tokens=args.num_virtual_tokens,
                     lora_lr=args.lora_lr, prompt_tuning_lr=args.prompt_tuning_lr, max_new_tokens=args.max_new_tokens,
                     gen_batch_size=args.gen_batch_size, workdir=args.workdir, model_name=args.model, seed=args.seed,
                     control_init=args.control_init)
    report["settings"]["total_s"] = time.perf_counter() - start
    report["command"] = " ".join(["python", "bench/prompt_vs_tune.py", *(argv if argv is not None else sys.argv[1:])])
    print()
    print(markdown_table(report))
    print(f"\nprompt tuning initialised from {report['selected_template']!r}: {report['init_text']!r}")
    print(f"total {report['settings']['total_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
