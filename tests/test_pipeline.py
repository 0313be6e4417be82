"""Pipelines as one config (``stages:``): each stage feeds the next, a killed pipeline resumes in its stage, and
``{stages.NAME}`` names an earlier stage's output."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import qa_rows, write_jsonl
from tuneforge.config import ConfigError
from tuneforge.pipeline import is_pipeline, run_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def write(tmp_path, config):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_stages_chain_merge_and_a_rerun_skips_done_stages(tmp_path):
    trained, merged = [], []

    def train(config):
        trained.append((config.output, config.model, config.objective, config.overwrite))
        if config.objective == "dpo" and len(trained) == 3:
            raise KeyboardInterrupt  # killed in the last stage
        (tmp_path / "out" / config.output.rsplit("/", 1)[-1]).mkdir(parents=True, exist_ok=True)

    def merge(adapter, out):
        merged.append(adapter)
        (tmp_path / "tmp-merge").mkdir(exist_ok=True)
        import shutil
        shutil.copytree(tmp_path / "tmp-merge", out)

    path = write(tmp_path, {"model": "base-model", "method": "lora", "output": str(tmp_path / "out"), "max_steps": 3,
                            "stages": [{"name": "pt", "objective": "pretrain", "data": "t.jsonl"},
                                       {"name": "rm", "objective": "reward", "feed": False, "data": "p.jsonl"},
                                       {"name": "dpo", "objective": "dpo", "data": "p.jsonl",
                                        "eval_data": "{stages.rm}/x.jsonl"}]})
    assert is_pipeline(path)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path, train_fn=train, merge_fn=merge)
    out = tmp_path / "out"
    assert [t[1] for t in trained] == ["base-model", str(out / "pt" / "merged"), str(out / "pt" / "merged")]
    assert json.loads((out / "pipeline.json").read_text())["done"] == {"pt": str(out / "pt"), "rm": str(out / "rm")}
    state = run_pipeline(path, train_fn=train, merge_fn=merge)
    assert [t[0] for t in trained] == [str(out / n) for n in ("pt", "rm", "dpo", "dpo")]  # only dpo again
    assert merged == [str(out / "pt"), str(out / "dpo")]
    assert state["model"] == str(out / "dpo" / "merged")


def test_a_bad_later_stage_fails_before_the_first_trains(tmp_path):
    path = write(tmp_path, {"output": str(tmp_path / "o"), "stages": [
        {"name": "sft", "objective": "sft"}, {"name": "dpo", "objective": "dpo", "dpo_bta": 0.1}]})
    with pytest.raises(ConfigError, match="stage dpo: .*bta"):
        run_pipeline(path, train_fn=lambda c: pytest.fail("trained"))
    path = write(tmp_path, {"stages": [{"name": "a", "data": "{stages.b}/x.jsonl"}, {"name": "b"}]})
    with pytest.raises(ConfigError, match="names no earlier stage"):
        run_pipeline(path, train_fn=lambda c: pytest.fail("trained"))


def test_two_stage_pipeline_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    from tuneforge.cli import main

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 8)
    sft = write_jsonl(tmp_path / "sft.jsonl", qa_rows(8))
    path = write(tmp_path, {"model": str(tiny_model_dir), "output": str(tmp_path / "run"), "max_steps": 1,
                            "batch_size": 2, "max_length": 64, "progress": False, "eval_generate": False,
                            "general_eval": None,
                            "stages": [{"name": "pretrain", "objective": "pretrain", "data": f"{text}"},
                                       {"name": "sft", "objective": "sft", "data": str(sft)}]})
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"final model: {tmp_path / 'run' / 'sft' / 'merged'}" in out
    saved = yaml.safe_load((tmp_path / "run" / "sft" / "tuneforge.yaml").read_text())
    assert saved["model"] == str(tmp_path / "run" / "pretrain" / "merged")
