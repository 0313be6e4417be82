"""The studio's buttons as Python (what the page calls): the form's paths confined to the workspace, launching
queues the exact command shown, the runs list merges queued jobs with run folders, resume and export commands."""

from __future__ import annotations

import json

import pytest

from tuneforge.errors import ConfigError
from tuneforge.studio.actions import Studio
from tuneforge.studio.jobs import QUEUED, Jobs
from tuneforge.studio.workspace import Workspace


class NoChat:
    def close(self) -> None:
        pass


@pytest.fixture
def studio(tmp_path):
    (tmp_path / "ws").mkdir()
    workspace = Workspace(tmp_path / "ws")
    # parallel=0: nothing starts, so what was queued can be looked at
    return Studio(workspace, Jobs(workspace, parallel=0), chat=NoChat())


def values(studio: Studio, **changes):
    out = studio.initial_values()
    for key, value in changes.items():
        out[next(i for i, f in enumerate(studio.fields) if f.key == key)] = value
    return out


def test_the_studio_form_starts_with_a_fresh_output_and_no_progress_bar(studio):
    filled = studio.check_form(studio.initial_values())
    assert filled.error is None
    assert filled.command == "tuneforge train --output runs/studio-1 --progress false"


@pytest.mark.parametrize("key,value", [("data", "../x.jsonl"), ("eval_data", "/etc/hosts"), ("output", "../out"),
                                       ("model", "/usr"), ("data", "a.jsonl:0.5,../b.jsonl:0.5"),
                                       ("general_eval", "../general.jsonl"),
                                       ("general_eval", "tasks:../tasks/my.yaml")])
def test_every_path_of_the_form_is_confined_to_the_workspace(studio, key, value):
    filled = studio.check_form(values(studio, **{key: value}))
    assert "outside the workspace" in filled.error and filled.config is None
    assert filled.field is not None and filled.field.key == key
    assert studio.launch(values(studio, **{key: value}))[1] is None  # nothing queued


def test_launch_queues_the_command_shown(studio):
    filled, job = studio.launch(values(studio, data="demo", max_steps="3", lora_r=4))
    assert job.state == QUEUED and job.output == "runs/studio-1"
    assert job.command == filled.command
    assert job.args == ["train", *filled.tokens]
    assert studio.next_output() == "runs/studio-2"  # the next form gets a fresh folder
    assert studio.runs_table()[0][:2] == ["runs/studio-1", QUEUED]


def test_resume_and_stop_act_on_unfinished_runs_only(studio):
    run = studio.workspace.root / "runs" / "old"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"finished": False}))
    (run / "tuneforge.yaml").write_text("method: lora\n")
    assert "resume queued" in studio.resume("runs/old")
    job = studio.jobs.all()[-1]
    assert job.args == ["train", "runs/old/tuneforge.yaml", "--resume", "--progress", "false"]
    assert "already queued" in studio.resume("runs/old")
    assert "stop requested" in studio.stop("runs/old")
    (run / "run.json").write_text(json.dumps({"finished": True}))
    assert "only a stopped run resumes" in studio.resume("runs/old")
    with pytest.raises(ConfigError, match="outside the workspace"):
        studio.resume("../elsewhere")


def test_export_commands(studio):
    (studio.workspace.root / "runs" / "a").mkdir(parents=True)
    assert studio.export_args("runs/a", "merge", "", "f16") == ["merge", "runs/a", "--output", "runs/a-merged"]
    assert studio.export_args("runs/a", "gguf", "", "q8_0") == ["export", "runs/a", "--format", "gguf", "--output",
                                                                "runs/a.gguf", "--dtype", "q8_0"]
    assert studio.export_args("runs/a", "vllm", "out/v", "f16")[-2:] == ["--output", "out/v"]
    with pytest.raises(ConfigError, match="outside the workspace"):
        studio.export_args("runs/a", "merge", "/tmp/merged", "f16")
    job = studio.export("runs/a", "ollama", "", "f16")
    assert job.output == "runs/a-ollama" and studio.export_jobs()[0][:2] == ["runs/a-ollama", QUEUED]
