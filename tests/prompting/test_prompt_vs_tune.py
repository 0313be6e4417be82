"""bench/prompt_vs_tune.py end to end on a tiny random model: every row runs, is scored the same way and costs
what it should (few-shot prompts are longer, soft prompts add their virtual tokens, only trained rows train)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import make_tiny_model
from tuneforge.data.formats import load_examples
from tuneforge.prompting import PromptBuilder, load_template

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "tuneforge" / "assets" / "demo"


def _bench():
    spec = importlib.util.spec_from_file_location("prompt_vs_tune", ROOT / "bench" / "prompt_vs_tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


def _subset(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


def test_data_prompt_template_renders_what_training_sees(bench, tmp_path):
    # The trained rows are scored through this template: it must give the prompt tuneforge trains them on.
    path = _subset(DEMO / "eval.jsonl", tmp_path / "eval.jsonl", 8)
    for record, example in zip(bench.read_records(path), load_examples(str(path))):
        assert bench.data_prompt_template().render(record) == example.messages[:-1]


def test_few_shot_file_is_the_zero_shot_prompt_plus_examples(bench):
    zero = load_template(ROOT / "examples" / "prompting" / "dates_zero_shot.yaml")
    few = load_template(ROOT / "examples" / "prompting" / "dates_few_shot.yaml")
    train = bench.read_records(DEMO / "train.jsonl")
    record = bench.read_records(DEMO / "eval.jsonl", 1)[0]
    derived = PromptBuilder(bench.with_fewshot(zero, 3), pool=train)(record)
    assert PromptBuilder(few)(record) == derived
    assert len(derived) == 1 + 2 * 3 + 1  # system, three solved examples, the query


def test_hard_prompt_text_keeps_task_wording_and_drops_the_query(bench):
    records = bench.read_records(DEMO / "train.jsonl", 20)
    assert bench.hard_prompt_text(load_template("zero_shot"), records) == "Write this date as YYYY-MM-DD."
    text = bench.hard_prompt_text(load_template(ROOT / "examples" / "prompting" / "dates_zero_shot.yaml"), records)
    assert text.startswith("You convert dates to ISO 8601.") and text.endswith("\nDate")
    assert not any(r["input"] in text for r in records)


def prompt_kind(messages: list[dict[str, str]]) -> str:
    """Which of the bench's prompts this is: the records' own, the two candidate templates, or few-shot."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    if sum(m["role"] == "user" for m in messages) > 1:
        return "few-shot"
    if system.startswith("You convert dates"):
        return "dates"
    return "data" if system else "zero_shot"


# What each row answers, so its scores are known: (which load() made the model, prompt kind) -> (a, b): the first a
# records get the reference, the next b the reference with a trailing period (wrong strictly, right leniently),
# the rest "no idea". Model 0 is the base; 1, 2, 3 are trained: prompt tuning (text init, vocab init), LoRA.
SCRIPT = {(0, "data"): (1, 0), (0, "zero_shot"): (0, 1), (0, "dates"): (2, 1), (0, "few-shot"): (3, 1),
          (1, "data"): (4, 0), (2, "data"): (0, 2), (3, "data"): (1, 2)}


def test_compare_runs_every_row_on_a_tiny_model(bench, tokenizer, tmp_path, single_thread, monkeypatch):
    train_path = _subset(DEMO / "train.jsonl", tmp_path / "train.jsonl", 24)
    eval_path = _subset(DEMO / "eval.jsonl", tmp_path / "eval.jsonl", 4)
    references = {r["input"]: r["output"] for r in bench.read_records(train_path) + bench.read_records(eval_path)}
    models, calls = [], []

    def load():
        models.append(make_tiny_model("llama", len(tokenizer)))
        return models[-1], tokenizer

    real_generate = bench.generate

    def scripted(model, tok, prompts, **kwargs):
        outputs = real_generate(model, tok, prompts, **kwargs)  # every row really generates through its model
        assert len(outputs) == len(prompts)
        key = (next(i for i, m in enumerate(models) if m is model), prompt_kind(prompts[0]))
        calls.append(key)
        exact, period = SCRIPT[key]
        # The query is the last user turn; the longest record input it holds is its own ("5 March" is in "15 March").
        refs = [references[max((k for k in references if k in p[-1]["content"]), key=len)] for p in prompts]
        return [ref if j < exact else ref + "." if j < exact + period else "no idea" for j, ref in enumerate(refs)]

    monkeypatch.setattr(bench, "generate", scripted)
    templates = [load_template("zero_shot"), load_template(ROOT / "examples" / "prompting" / "dates_zero_shot.yaml")]
    report = bench.compare(load, train_path=train_path,
                           eval_path=eval_path, templates=templates, steps=2, batch_size=4, max_length=96,
                           eval_limit=4, select_on=2, few_shot_k=2, max_new_tokens=4, gen_batch_size=4,
                           workdir=tmp_path / "runs", model_name="tiny-llama", control_init=True)
    data, zero, few, pt, control, lora = report["rows"]
    assert [r["method"] for r in report["rows"]] == ["base", "base", "base", "prompt tuning", "prompt tuning", "LoRA"]
    # Each row is scored on its own model and prompts: base rows on the base (selection on 2 training records
    # first), trained rows each on the model its own run trained.
    assert calls == [(0, "data"), (0, "zero_shot"), (0, "dates"), (0, "dates"), (0, "few-shot"), (1, "data"),
                     (2, "data"), (3, "data")]
    # Strict exact match counts the exact answers only; the lenient column also the ones with a trailing period.
    assert [(r["n"], r["exact_match"], r["exact_match_lenient"]) for r in report["rows"]] == [
        (4, 0.25, 0.25), (4, 0.5, 0.75), (4, 0.75, 1.0), (4, 1.0, 1.0), (4, 0.0, 0.5), (4, 0.25, 0.75)]
    eval_refs = [r["output"] for r in bench.read_records(eval_path)]
    assert lora["samples"] == [{"reference": eval_refs[0], "output": eval_refs[0]},
                               {"reference": eval_refs[1], "output": eval_refs[1] + "."},
                               {"reference": eval_refs[2], "output": eval_refs[2] + "."}]
    # The template with the better exact match on the selection records wins (2 / 2 against 0 / 2).
    assert [(s["template"], s["n"], s["exact_match"], s["exact_match_lenient"]) for s in report["selection"]] == [
        ("zero_shot", 2, 0.0, 0.5), ("dates_zero_shot", 2, 1.0, 1.0)]
    assert report["selected_template"] == "dates_zero_shot" and zero["prompt"] == "dates_zero_shot, zero-shot"
    assert few["prompt_tokens"] > zero["prompt_tokens"] + 10  # two solved examples make the prompt longer
    n_virtual = report["settings"]["num_virtual_tokens"]
    assert n_virtual == len(tokenizer(report["init_text"])["input_ids"])
    assert pt["prompt_tokens"] == pytest.approx(data["prompt_tokens"] + n_virtual)
    assert lora["prompt_tokens"] == pytest.approx(data["prompt_tokens"])
    assert pt["trainable_params"] == control["trainable_params"] == n_virtual * 32  # a hidden-size vector each
    assert "vocab sample" in control["prompt"] and control["prompt_tokens"] == pt["prompt_tokens"]
    assert lora["trainable_params"] > 0 and zero["trainable_params"] == few["trainable_params"] == 0
    assert pt["train_s"] > 0 and lora["train_s"] > 0 and zero["train_s"] == 0
    assert (tmp_path / "runs" / "prompt_tuning-text" / "adapter_model.safetensors").is_file()
    adapter = json.loads((tmp_path / "runs" / "prompt_tuning-text" / "adapter_config.json").read_text())
    assert adapter["prompt_tuning_init_text"] == report["init_text"]
    table = bench.markdown_table(report).splitlines()
    assert len(table) == 2 + 6
    for line, (exact, lenient) in zip(table[2:], [("0.250 (1/4)", "0.250"), ("0.500 (2/4)", "0.750"),
                                                  ("0.750 (3/4)", "1.000"), ("1.000 (4/4)", "1.000"),
                                                  ("0.000 (0/4)", "0.500"), ("0.250 (1/4)", "0.750")]):
        assert line.split(" | ")[2:4] == [exact, lenient], line


def test_every_row_is_scored_strictly_with_a_lenient_column_beside(bench):
    assert bench.strict_exact("  2021-03-05\n", "2021-03-05") == 1.0
    assert bench.strict_exact("2021-03-05.", "2021-03-05") == 0.0  # a trailing period is a wrong answer
    assert bench.lenient_exact("2021-03-05.", "2021-03-05") == 1.0
