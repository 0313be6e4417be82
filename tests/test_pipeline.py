"""Pipelines as one config (``stages:``): each stage feeds the next, a killed pipeline resumes in its stage, and
``{stages.NAME}`` names an earlier stage's output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import qa_rows, write_jsonl
from tuneforge.config import ConfigError
from tuneforge.outputs import OutputConflict
from tuneforge.run.pipeline import is_pipeline, run_pipeline
from tuneforge.run.reuse import SettingsChanged

pytestmark = pytest.mark.usefixtures("single_thread")


def write(tmp_path, config):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def finish(config):
    """What a finished training run leaves for the pipeline to see: its folder and a finished run.json."""
    run_dir = Path(config.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": "x", "finished": True}))


def fake_merge(adapter, out):
    Path(out).mkdir(parents=True)
    (Path(out) / "config.json").write_text("{}")


def test_stages_chain_merge_and_a_rerun_skips_done_stages(tmp_path):
    trained, merged = [], []

    def train(config):
        trained.append((config.output, config.model, config.objective, config.overwrite))
        if config.objective == "dpo" and len(trained) == 3:
            raise KeyboardInterrupt  # killed in the last stage
        finish(config)

    def merge(adapter, out):
        merged.append(adapter)
        fake_merge(adapter, out)

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
    from tuneforge.commands.main import main

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
    runs = [json.loads((tmp_path / "run" / n / "run.json").read_text()) for n in ("pretrain", "sft")]
    assert main(["train", str(path)]) == 0  # nothing changed: both stages reused, nothing trains
    assert [json.loads((tmp_path / "run" / n / "run.json").read_text()) for n in ("pretrain", "sft")] == runs
    assert main(["train", str(path), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"tuneforge: error: {path}: stage pretrain: max_steps 1 -> 2; pass --overwrite to retrain "
                       "from this stage")


def two_stages(tmp_path, **shared):
    """A pretrain -> sft pipeline on two data files, trained by a fake that records (stage, max_steps)."""
    write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox."}] * 4)
    write_jsonl(tmp_path / "sft.jsonl", qa_rows(4))
    return write(tmp_path, {"model": "base-model", "output": str(tmp_path / "out"), "max_steps": 5, **shared,
                            "stages": [{"name": "pt", "objective": "pretrain", "data": str(tmp_path / "text.jsonl")},
                                       {"name": "sft", "objective": "sft", "data": str(tmp_path / "sft.jsonl")}]})


def test_a_changed_stage_is_refused_naming_what_changed_and_overwrite_retrains_from_it(tmp_path):
    trained = []

    def train(config):
        trained.append((Path(config.output).name, config.max_steps))
        finish(config)

    def run(**overrides):
        trained.clear()
        run_pipeline(path, overrides, train_fn=train, merge_fn=fake_merge)
        return trained

    path = two_stages(tmp_path)
    assert run() == [("pt", 5), ("sft", 5)]
    assert run() == []  # nothing changed: both reused
    write_jsonl(tmp_path / "sft.jsonl", qa_rows(5))
    with pytest.raises(SettingsChanged, match=r"stage sft: data changed \(.*sft.jsonl\); pass --overwrite"):
        run()
    with pytest.raises(SettingsChanged, match="stage pt: max_steps 5 -> 8; pass --overwrite"):  # the first change
        run(max_steps=8)
    assert trained == []
    assert run(overwrite=True) == [("sft", 5)]  # the changed stage only: pt is as it was
    assert run(overwrite=True) == [("pt", 5), ("sft", 5)]  # nothing changed: the user asked for every stage
    assert run() == []


def test_a_retrained_stage_makes_every_later_stage_train_again(tmp_path):
    trained, kill = [], []

    def train(config):
        trained.append(Path(config.output).name)
        if kill and config.objective == "sft":
            raise KeyboardInterrupt  # killed after pt was retrained
        finish(config)

    path = two_stages(tmp_path)
    run_pipeline(path, train_fn=train, merge_fn=fake_merge)
    kill.append(True)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path, {"max_steps": 8, "overwrite": True}, train_fn=train, merge_fn=fake_merge)
    kill.clear()
    trained.clear()
    # sft's own settings did not change, but it started from the old pt: stale, so it trains without asking.
    state = run_pipeline(path, {"max_steps": 8}, train_fn=train, merge_fn=fake_merge)
    assert trained == ["sft"]
    assert state["done"] == {"pt": str(tmp_path / "out" / "pt"), "sft": str(tmp_path / "out" / "sft")}


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "x y"])
def test_a_stage_name_must_be_a_plain_folder_name(tmp_path, bad):
    # `..` would train into (and adopt) whatever finished run sits beside the pipeline's folder.
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "other", "finished": True}))
    path = write(tmp_path, {"output": str(tmp_path / "out"), "stages": [{"name": bad, "objective": "sft"}]})
    with pytest.raises(ConfigError, match=rf"pipeline.yaml: stage {re.escape(repr(bad))}: .*plain folder name"):
        run_pipeline(path, train_fn=lambda c: pytest.fail("trained"))


def test_stage_names_must_differ(tmp_path):
    path = write(tmp_path, {"stages": [{"objective": "sft"}, {"objective": "sft"}]})
    with pytest.raises(ConfigError, match="pipeline.yaml: stage names must differ; got sft, sft"):
        run_pipeline(path, train_fn=lambda c: pytest.fail("trained"))


def test_the_output_is_never_an_input_nor_someone_elses_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = two_stages(tmp_path, model=str(model), output=str(model))
    with pytest.raises(OutputConflict, match="output .*model is the input"):
        run_pipeline(path, train_fn=lambda c: pytest.fail("trained"))
    path = two_stages(tmp_path, output=str(tmp_path))  # holds the data files
    with pytest.raises(OutputConflict, match="contains the input"):
        run_pipeline(path, train_fn=lambda c: pytest.fail("trained"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    path = two_stages(tmp_path, output=str(other))
    with pytest.raises(OutputConflict, match="not empty; pass --overwrite"):
        run_pipeline(path, train_fn=lambda c: pytest.fail("trained"))
    run_pipeline(path, {"overwrite": True}, train_fn=finish, merge_fn=fake_merge)
    assert (other / "sft" / "run.json").is_file() and (other / "notes.txt").is_file()
