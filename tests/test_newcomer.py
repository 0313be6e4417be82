"""A newcomer's first hour (issue 24): progress on long waits, one precision for one question, the prompt files
people have, the bundled task by name, help generated from the registries."""

from __future__ import annotations

import json
import logging

import pytest

import tuneforge
from conftest import make_tiny_model, save_tiny_model_dir, write_jsonl
from tuneforge.commands.main import build_parser, main
from tuneforge.data.formats import FORMATS, DataError, load_prompts
from tuneforge.inference.loading import recorded_base_model, training_dtype
from tuneforge.methods.base import METHODS
from tuneforge.objectives.base import OBJECTIVES

pytestmark = pytest.mark.usefixtures("single_thread")


def test_exact_match_says_when_it_starts_and_ends_off_a_terminal(tmp_path, tokenizer, caplog):
    from tuneforge.inference.evaluate import exact_match

    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(3)]
    examples = tuneforge.data.formats.load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        exact_match(make_tiny_model("llama", len(tokenizer)), tokenizer, examples, max_new_tokens=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("exact match:")]
    assert lines[0] == "exact match: 3 prompt(s)..." and lines[1].startswith("exact match: 3 prompt(s) in ")


def test_the_prompt_files_people_have_are_read_as_prompts(tmp_path):
    files = {
        "alpaca_no_output.jsonl": [{"instruction": "Translate", "input": "chat"}],
        "instruction.jsonl": [{"instruction": "Name a colour.", "system": "Be brief."}],
        "question.jsonl": [{"question": "What is 2+2?"}],
        "chat.jsonl": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
    }
    want = {"alpaca_no_output.jsonl": [{"role": "user", "content": "Translate\n\nchat"}],
            "instruction.jsonl": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Name a colour."}],
            "question.jsonl": [{"role": "user", "content": "What is 2+2?"}],
            "chat.jsonl": [{"role": "user", "content": "Hi"}]}
    for name, rows in files.items():
        assert load_prompts(write_jsonl(tmp_path / name, rows))[0].messages == want[name], name
    (tmp_path / "prompts.txt").write_text("first prompt\n\n  second prompt  \n")
    assert [p.messages[0]["content"] for p in load_prompts(tmp_path / "prompts.txt")] == ["first prompt",
                                                                                         "second prompt"]
    assert load_prompts(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x"}]), "alpaca")[0].messages
    with pytest.raises(DataError, match=r"b.jsonl:1: no prompt"):
        load_prompts(write_jsonl(tmp_path / "b.jsonl", [{"answer": "x"}]))


def test_generate_answers_a_file_of_questions_without_answers(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "questions.jsonl", [{"instruction": "Say hi."}, {"question": "Why?"}])
    out = tmp_path / "preds.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--max-new-tokens", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("instruction", r.get("question")) for r in rows] == ["Say hi.", "Why?"]
    assert all("prediction" in r for r in rows)


def test_the_bundled_task_is_addressable_by_name(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--data", "demo", "--limit", "2", "--no-generate",
                 "--json"]) == 0
    assert "perplexity" in json.loads(capsys.readouterr().out)
    assert main(["data", "preview", "demo", "--model", str(tiny_model_dir), "--no-color"]) == 0
    assert "demo/train.jsonl:1" in capsys.readouterr().out  # the first bundled record, rendered
    assert len(tuneforge.data.formats.load_examples("demo:eval")) < len(tuneforge.data.formats.load_examples("demo"))


def test_train_help_lists_every_registered_method_objective_and_format():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    lines = {line.split()[0]: line for line in help_text.splitlines() if line.strip().startswith("--")}
    for flag, names in (("--method", METHODS.names()), ("--objective", OBJECTIVES.names()),
                        ("--data-format", FORMATS)):
        assert all(name in lines[flag] for name in names), (flag, lines[flag])
    assert {"grpo", "orpo", "simpo", "kto"} <= set(OBJECTIVES.names()) and "unpaired" in FORMATS


def test_eval_computes_in_the_precision_the_run_trained_in(tmp_path, tokenizer, sft_file):
    config = tuneforge.load_config(None, dict(data=str(sft_file), output=str(tmp_path / "run"), max_steps=1,
                                              batch_size=2, max_length=32, progress=False, eval_generate=False,
                                              general_eval=None))
    tuneforge.train(config, make_tiny_model("llama", len(tokenizer)), tokenizer)
    precision = json.loads((tmp_path / "run" / "run.json").read_text())["precision"]
    assert precision == {"device": "cpu", "dtype": "float32"}
    assert training_dtype(tmp_path / "run", "cpu") == "float32"
    (tmp_path / "run" / "run.json").write_text(json.dumps({"precision": {"device": "cpu", "dtype": "bfloat16"}}))
    assert training_dtype(tmp_path / "run", "cpu") == "bfloat16"  # what `eval --adapter RUN` then loads in
    assert training_dtype(tmp_path / "run", "cuda") is None  # another kind of device: its own default


def test_an_adapter_records_a_base_path_peft_can_open_and_keeps_the_name(tmp_path, tokenizer, monkeypatch):
    import tuneforge.models.loading as models

    local = save_tiny_model_dir(tmp_path / "embedded-dir", "llama", tokenizer)
    monkeypatch.setitem(models.EMBEDDED, "tiny-embedded", ("nowhere", "x.gguf"))
    monkeypatch.setattr(models, "local_model_dir", lambda name: local if name == "tiny-embedded" else None)
    run = tuneforge.attach(make_tiny_model("llama", len(tokenizer)), tuneforge.LoRAConfig(r=2)).save(
        tmp_path / "adapter", base_model_name_or_path="tiny-embedded")
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(local)
    assert recorded_base_model(run) == "tiny-embedded"
