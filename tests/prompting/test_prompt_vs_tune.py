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


def test_compare_runs_every_row_on_a_tiny_model(bench, tokenizer, tmp_path, single_thread):
    train_path = _subset(DEMO / "train.jsonl", tmp_path / "train.jsonl", 24)
    eval_path = _subset(DEMO / "eval.jsonl", tmp_path / "eval.jsonl", 4)
    templates = [load_template("zero_shot"), load_template(ROOT / "examples" / "prompting" / "dates_zero_shot.yaml")]
    report = bench.compare(lambda: (make_tiny_model("llama", len(tokenizer)), tokenizer), train_path=train_path,
                           eval_path=eval_path, templates=templates, steps=2, batch_size=4, max_length=96,
                           eval_limit=4, select_on=2, few_shot_k=2, max_new_tokens=4, gen_batch_size=4,
                           workdir=tmp_path / "runs", model_name="tiny-llama", control_init=True)
    data, zero, few, pt, control, lora = report["rows"]
    assert [r["method"] for r in report["rows"]] == ["base", "base", "base", "prompt tuning", "prompt tuning", "LoRA"]
    assert all(r["n"] == 4 and 0.0 <= r["exact_match"] <= r["exact_match_lenient"] for r in report["rows"])
    assert len(report["selection"]) == 2 and zero["prompt"].startswith(report["selected_template"])
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
    assert "|" in bench.markdown_table(report) and "prompt tuning" in bench.markdown_table(report)


def test_every_row_is_scored_strictly_with_a_lenient_column_beside(bench):
    assert bench.strict_exact("  2021-03-05\n", "2021-03-05") == 1.0
    assert bench.strict_exact("2021-03-05.", "2021-03-05") == 0.0  # a trailing period is a wrong answer
    assert bench.lenient_exact("2021-03-05.", "2021-03-05") == 1.0
