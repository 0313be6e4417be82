"""Templates: loading and validation, rendering, few-shot selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.prompting import PromptBuilder, TemplateError, TfidfIndex, builtin_template_names, load_template
from tuneforge.prompting.template import fill_placeholders

POOL = [
    {"instruction": "What is the capital of France?", "output": "Paris"},
    {"instruction": "Classify the sentiment: I loved this film", "output": "positive"},
    {"instruction": "What is the capital of Spain?", "output": "Madrid"},
    {"instruction": "Classify the sentiment: a dull, boring plot", "output": "negative"},
    {"instruction": "Translate to French: good morning", "output": "bonjour"},
    {"instruction": "Add 2 and 3.", "output": "5"},
]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_templates_load_and_render_alpaca_records():
    names = builtin_template_names()
    assert {"zero_shot", "role_expert", "few_shot", "cot"} <= set(names)
    record = {"instruction": "Name a colour.", "input": "", "output": "red"}
    for name in ("zero_shot", "role_expert", "cot"):
        messages = load_template(name).render(record)
        assert messages[-1]["role"] == "user"
        assert messages[-1]["content"].startswith("Name a colour.")
        assert "\n\n\n" not in messages[-1]["content"]  # the empty {input?} leaves no blank-line run


def test_render_system_fewshot_turns_and_reasoning(tmp_path):
    template = load_template(write(tmp_path / "t.yaml", (
        "system: You are a {role?}geographer.\n"
        "instruction: 'Q: {instruction}'\n"
        "response: 'A: {output}'\n"
        "reasoning: Think step by step.\n")))
    examples = POOL[:2]
    messages = template.render({"instruction": "Capital of Italy?"}, examples)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == "You are a geographer."
    assert messages[1]["content"] == "Q: What is the capital of France?"
    assert messages[2]["content"] == "A: Paris"
    assert "Think step by step" not in messages[1]["content"]  # reasoning goes to the query turn only
    assert messages[-1]["content"] == "Q: Capital of Italy?\n\nThink step by step."


def test_missing_field_error_names_template_file_and_field(tmp_path):
    path = write(tmp_path / "needs_context.yaml", "instruction: '{question} given {context}'\n")
    template = load_template(path)
    with pytest.raises(TemplateError) as e:
        template.render({"question": "why?"})
    assert "needs_context.yaml" in str(e.value) and "'context'" in str(e.value)


def test_unknown_key_error_names_file_and_key(tmp_path):
    with pytest.raises(TemplateError, match=r"bad\.yaml.*unknown key 'instructions'"):
        load_template(write(tmp_path / "bad.yaml", "instructions: hi\n"))
    with pytest.raises(TemplateError, match=r"nested\.yaml.*unknown key 'fewshot.strategyy'"):
        load_template(write(tmp_path / "nested.yaml", "instruction: hi\nfewshot: {strategyy: first}\n"))
    with pytest.raises(TemplateError, match=r"strat\.yaml.*fewshot.strategy"):
        load_template(write(tmp_path / "strat.yaml", "instruction: hi\nfewshot: {strategy: best}\n"))
    with pytest.raises(TemplateError, match="regular expression"):
        load_template(write(tmp_path / "re.yaml", "instruction: hi\nanswer_pattern: '(unclosed'\n"))
    with pytest.raises(TemplateError, match="neither a file nor a built-in"):
        load_template("no_such_template")


def test_placeholders_leave_json_braces_and_escapes_alone():
    text = 'Reply {"question": "<q>"} about {topic} {{literal}}'
    assert fill_placeholders(text, {"topic": "LoRA"}) == 'Reply {"question": "<q>"} about LoRA {literal}'


def test_extract_answer_takes_last_match():
    template = load_template("cot")
    output = "Answer: maybe 3?\nLet me recheck: 2 + 2 = 4.\nAnswer: 4"
    assert template.extract_answer(output) == "4"
    assert template.extract_answer("no marker here") == "no marker here"


def fewshot_template(tmp_path: Path, strategy: str, k: int = 2, seed: int = 0, data: str | None = None):
    body = f"instruction: '{{instruction}}'\nfewshot: {{k: {k}, strategy: {strategy}, seed: {seed}"
    body += f", data: {data}}}\n" if data else "}\n"
    return load_template(write(tmp_path / f"{strategy}{seed}.yaml", body))


def test_first_k_skips_the_query_itself(tmp_path):
    builder = PromptBuilder(fewshot_template(tmp_path, "first"), POOL)
    assert builder.select(POOL[0]) == [POOL[1], POOL[2]]  # POOL[0] is the query: never its own example
    assert builder.select({"instruction": "new"}) == [POOL[0], POOL[1]]


def test_random_k_is_deterministic_per_seed_and_varies_by_seed(tmp_path):
    query = {"instruction": "Capital of Portugal?"}
    draw = lambda seed: PromptBuilder(fewshot_template(tmp_path, "random", 3, seed), POOL).select(query)
    assert draw(0) == draw(0)
    assert len(draw(0)) == 3 and all(x in POOL for x in draw(0))
    assert len({json.dumps(draw(s)) for s in range(6)}) > 1  # different seeds, different draws


def test_similar_picks_the_obviously_similar_record_last(tmp_path):
    builder = PromptBuilder(fewshot_template(tmp_path, "similar", 2), POOL)
    chosen = builder.select({"instruction": "What is the capital of Germany?"})
    assert chosen[-1]["output"] in {"Paris", "Madrid"} and chosen[0]["output"] in {"Paris", "Madrid"}
    chosen = builder.select({"instruction": "Classify the sentiment: I loved the acting"})
    assert chosen[-1] == POOL[1]  # shares "loved" with the positive review
    assert builder.select(POOL[1])[-1] != POOL[1]  # the query record is excluded


def test_fewshot_data_file_is_relative_to_the_template(tmp_path):
    (tmp_path / "pool.jsonl").write_text("\n".join(json.dumps(r) for r in POOL) + "\n")
    builder = PromptBuilder(fewshot_template(tmp_path, "similar", 1, data="pool.jsonl"))
    messages = builder({"instruction": "Translate to French: good night"})
    assert messages[0] == {"role": "user", "content": "Translate to French: good morning"}
    assert messages[1] == {"role": "assistant", "content": "bonjour"}


def test_tfidf_ranks_shared_rare_terms_above_common_ones():
    index = TfidfIndex(["the cat sat on the mat", "the dog ran in the park", "quantum chromodynamics lecture"])
    scores = index.similarities("a lecture on quantum chromodynamics")
    assert max(range(3), key=scores.__getitem__) == 2
    assert scores[2] > 0.5 > scores[1]
