"""lm-evaluation-harness benchmarks (tuneforge/inference/benchmarks.py): ``eval --tasks`` and ``--general-eval
tasks:...``.

Offline: the tasks are lm-eval YAML tasks written into tmp_path over local JSONL files (``dataset_path: json``), run
on tiny random models with a LoRA adapter. Every number is checked against the same quantity computed here with
the model directly: the log-likelihood of each choice for multiple choice, greedy answers for generation.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import tuneforge
from tuneforge.inference.benchmarks import Benchmarks
from tuneforge.commands.main import main
from tuneforge.choose.compare import markdown, read_row
from tuneforge.errors import ConfigError
from tuneforge.inference.generate import generate_ids

from conftest import make_tiny_model, qa_rows, write_jsonl

pytest.importorskip("lm_eval")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Say {{{{number}}}} in words. The answer is"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Say {{{{number}}}} in words."
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
"""


def mc_rows(n: int = 8) -> list[dict]:
    return [{"number": i, "choices": [WORDS[i], WORDS[(i + 3) % 10], WORDS[(i + 5) % 10] + " point"],
             "answer": i % 3} for i in range(n)]


def write_task(folder: Path, name: str, template: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / f"{name}.jsonl", rows)
    path = folder / f"{name}.yaml"
    path.write_text(template.format(data=data))
    return path


def adapted_model(tokenizer):
    """A tiny Llama with a non-trivial LoRA adapter (random B), so the adapter changes every number."""
    model = make_tiny_model("llama", len(tokenizer))
    torch.manual_seed(0)
    handle = tuneforge.attach(model, tuneforge.LoRAConfig(r=4, init_lora_weights=False))
    return model, handle


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), the continuation's tokens being those of the whole string past the context's."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    start = len(tokenizer(context, add_special_tokens=False).input_ids)
    logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(start, len(whole)))


def test_multiple_choice_accuracy_is_the_argmax_of_the_models_own_loglikelihoods(tmp_path, tokenizer):
    rows = mc_rows()
    task = write_task(tmp_path / "tasks", "tiny_mc", MC_YAML, rows)
    model, handle = adapted_model(tokenizer)
    model.train()  # as in training: evaluated in eval mode, handed back in training mode
    out = Benchmarks([str(task)], batch_size=3).run(model, tokenizer, log_samples=True)
    assert model.training
    model.eval()
    hits, hits_norm = [], []
    for row, sample in zip(rows, sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])):
        context = f"Say {row['number']} in words. The answer is"
        lls = [loglikelihood(model, tokenizer, context, " " + choice) for choice in row["choices"]]
        assert [arg[0] for arg in sample["arguments"]] == [context] * 3
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-4)
        hits.append(max(range(3), key=lambda i: lls[i]) == row["answer"])
        norm = [ll / len(choice) for ll, choice in zip(lls, row["choices"])]
        hits_norm.append(max(range(3), key=lambda i: norm[i]) == row["answer"])
    results = out["results"]["tiny_mc"]
    assert results["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert results["acc_norm,none"] == pytest.approx(sum(hits_norm) / len(hits_norm))
    # The same numbers in tuneforge's shape; the adapter took part (the base scores the choices differently).
    summary = Benchmarks([str(task)]).evaluate(model, tokenizer)["tiny_mc"]
    assert summary["metrics"] == {"acc": pytest.approx(sum(hits) / 8), "acc_norm": pytest.approx(sum(hits_norm) / 8)}
    assert summary["primary"] == "acc" and summary["higher_is_better"] and summary["n"] == 8
    assert summary["stderr"]["acc"] > 0
    with handle.disabled():
        base = Benchmarks([str(task)]).run(model, tokenizer, log_samples=True)["samples"]["tiny_mc"]
    assert base[0]["filtered_resps"][0][0] != pytest.approx(out["samples"]["tiny_mc"][0]["filtered_resps"][0][0])


def test_generation_exact_match_compares_the_models_greedy_answer(tmp_path, tokenizer):
    model, _ = adapted_model(tokenizer)
    prompts = [f"Say {i} in words." for i in range(6)]
    ids = generate_ids(model, tokenizer, [tokenizer(p, add_special_tokens=False).input_ids for p in prompts],
                       max_new_tokens=5)
    answers = [tokenizer.decode(row, skip_special_tokens=True).split("\n")[0] for row in ids]
    assert len(set(answers)) > 1 or answers[0]  # something to match
    # Half the references are the model's own greedy answers: exact match must be exactly 3 / 6.
    rows = [{"number": i, "answer": answers[i] if i % 2 == 0 else answers[i] + " no"} for i in range(6)]
    task = write_task(tmp_path / "tasks", "tiny_gen", GEN_YAML, rows)
    results = Benchmarks([str(task)], batch_size=4).evaluate(model, tokenizer)
    assert results["tiny_gen"]["metrics"] == {"exact_match": pytest.approx(0.5)}
    assert results["tiny_gen"]["n"] == 6


def test_a_folder_is_every_task_in_it_and_limit_caps_documents(tmp_path, tokenizer):
    folder = tmp_path / "tasks"
    write_task(folder, "tiny_mc", MC_YAML, mc_rows())
    write_task(folder, "tiny_gen", GEN_YAML, [{"number": i, "answer": WORDS[i]} for i in range(4)])
    model, _ = adapted_model(tokenizer)
    results = Benchmarks(str(folder), limit=2).evaluate(model, tokenizer)
    assert sorted(results) == ["tiny_gen", "tiny_mc"] and {r["n"] for r in results.values()} == {2}


def test_bad_task_lists_fail_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="no such task YAML"):
        Benchmarks([str(tmp_path / "missing.yaml")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no lm-eval task YAML"):
        Benchmarks([str(tmp_path / "empty")])
    (tmp_path / "x.yaml").write_text("foo: 1\n")
    with pytest.raises(ConfigError, match="not an lm-eval task YAML"):
        Benchmarks([str(tmp_path / "x.yaml")])
    with pytest.raises(ConfigError, match="at least one"):
        Benchmarks(" , ")


def test_without_lm_eval_the_error_says_what_to_install(tmp_path, monkeypatch):
    task = write_task(tmp_path / "tasks", "tiny_mc", MC_YAML, mc_rows())
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ModuleNotFoundError
    with pytest.raises(ConfigError, match=r"pip install 'tuneforge\[eval\]'"):
        Benchmarks([str(task)])


@pytest.mark.slow
def test_an_unknown_lm_eval_name_is_refused_with_close_matches():
    """Indexes lm-eval's own ~15k task YAMLs (~10 s)."""
    with pytest.raises(ConfigError, match="unknown lm-eval task 'hellaswg'.*hellaswag"):
        Benchmarks("hellaswg")


def test_eval_tasks_cli_json_and_table(tmp_path, tiny_model_dir, adapter_dir, capsys):
    task = write_task(tmp_path / "tasks", "tiny_mc", MC_YAML, mc_rows())
    argv = ["eval", "--adapter", str(adapter_dir), "--tasks", str(task), "--limit", "5", "--device", "cpu"]
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, tokenizer, _ = tuneforge.load_for_inference(str(tiny_model_dir), str(adapter_dir), "cpu")
    assert printed == Benchmarks([str(task)], limit=5).evaluate(model, tokenizer)
    assert printed["tiny_mc"]["n"] == 5
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "metric", "value", "stderr", "n"]
    assert table[1].split()[:3] == ["tiny_mc", "acc", f"{printed['tiny_mc']['metrics']['acc']:.4f}"]
    # --data or --tasks, and a missing task file is named, before anything loads
    assert main(["eval", "--tasks", str(task), "--data", "demo"]) == 2
    assert main(["eval", "--tasks", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such task YAML" in capsys.readouterr().err


def test_general_eval_tasks_measure_forgetting_before_and_after_training(tmp_path, tokenizer, sft_file):
    task = write_task(tmp_path / "tasks", "tiny_mc", MC_YAML, mc_rows())
    config = tuneforge.load_config(None, {
        "data": str(sft_file), "output": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
        "learning_rate": 5e-2, "max_length": 64, "progress": False, "eval_generate": False, "warmup_steps": 0,
        "general_eval": f"tasks:{task}", "general_eval_limit": 6})
    model = make_tiny_model("llama", len(tokenizer))
    base = Benchmarks([str(task)], limit=6).evaluate(copy.deepcopy(model), tokenizer)["tiny_mc"]
    result = tuneforge.train(config, model, copy.deepcopy(tokenizer))
    after = Benchmarks([str(task)], limit=6).evaluate(result.model, tokenizer)["tiny_mc"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for when, row in (("before", base), ("after", after)):
        assert summary[f"benchmark_tiny_mc_acc_{when}"] == pytest.approx(row["metrics"]["acc"])
        assert summary[f"benchmark_tiny_mc_acc_norm_{when}"] == pytest.approx(row["metrics"]["acc_norm"])
        assert summary[f"benchmark_tiny_mc_acc_stderr_{when}"] == pytest.approx(row["stderr"]["acc"])
    assert summary["forgetting_tiny_mc"] == pytest.approx(base["metrics"]["acc"] - after["metrics"]["acc"])
    assert summary["benchmarks"]["tiny_mc"] == {
        "metric": "acc", "n": 6, "higher_is_better": True, "before": "benchmark_tiny_mc_acc_before",
        "after": "benchmark_tiny_mc_acc_after", "forgetting": "forgetting_tiny_mc"}
    assert "general_ppl_after" not in summary  # tasks replace the general-text perplexity
    # compare's row and table carry the task's columns
    row = read_row("lora", tmp_path / "run")
    assert row["forgetting_tiny_mc"] == summary["forgetting_tiny_mc"]
    header = markdown([row]).splitlines()[0]
    assert "tiny_mc acc before" in header and "tiny_mc acc after" in header and "tiny_mc forgetting" in header


def test_train_summary_prints_each_benchmark(tmp_path, tiny_model_dir, capsys):
    task = write_task(tmp_path / "tasks", "tiny_mc", MC_YAML, mc_rows(4))
    data = write_jsonl(tmp_path / "sft.jsonl", qa_rows(8))
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
               "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--progress", "false",
               "--eval-generate", "false", "--general-eval", f"tasks:{task}", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    line = next(line for line in out.splitlines() if line.startswith("benchmark tiny_mc"))
    assert line == (f"benchmark tiny_mc acc (n=4): {summary['benchmark_tiny_mc_acc_before']:.4f} -> "
                    f"{summary['benchmark_tiny_mc_acc_after']:.4f} (forgetting {summary['forgetting_tiny_mc']:+.4f})")
