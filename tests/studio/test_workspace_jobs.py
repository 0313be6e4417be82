"""The studio's safety and bookkeeping without a browser: paths confined to the workspace, the job queue (order,
stop, a restart that finds its jobs again), run folders read back as the runs list, the access key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneforge.errors import ConfigError
from tuneforge.studio.jobs import FAILED, FINISHED, QUEUED, RUNNING, STOPPED, Jobs, alive
from tuneforge.studio.runs import find_runs, run_info, series
from tuneforge.studio.server import KEY_ENV, key_checker, read_key
from tuneforge.studio.workspace import Workspace

# Stand-ins for `python -m tuneforge ARGS`. The "tuneforge" argument marks them as ours (jobs.alive checks the command
# line, so a reused pid is not taken for a job). SLEEPER sleeps ARGS[-1] seconds, then writes the file ARGS[-2];
# WAITER waits for the file ARGS[-1] to appear (the test says when), then writes ARGS[-2].
SLEEPER = [sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[-1])); open(sys.argv[-2], 'w')",
           "tuneforge"]
WAITER = [sys.executable, "-c", "import os, sys, time\nwhile not os.path.exists(sys.argv[-1]): time.sleep(0.05)\n"
          "open(sys.argv[-2], 'w')", "tuneforge"]


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    (tmp_path / "ws").mkdir()
    return Workspace(tmp_path / "ws")


def test_paths_outside_the_workspace_are_refused(workspace, tmp_path):
    (tmp_path / "secret.jsonl").write_text("{}\n")
    (workspace.root / "link").symlink_to(tmp_path)
    for path in ("../secret.jsonl", str(tmp_path / "secret.jsonl"), "link/secret.jsonl", "/etc/passwd", "~"):
        with pytest.raises(ConfigError, match="outside the workspace"):
            workspace.resolve(path, "data")
    assert workspace.resolve("runs/a") == workspace.root / "runs" / "a"
    assert workspace.resolve(str(workspace.root / "x.jsonl")) == workspace.root / "x.jsonl"


def test_names_that_are_not_paths_pass_and_local_ones_are_checked(workspace, tmp_path):
    assert workspace.data_path("demo") == "demo" and workspace.data_path("general:eval") == "general:eval"
    assert workspace.model_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert workspace.model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id
    (workspace.root / "model").mkdir()
    assert workspace.model_name(str(workspace.root / "model")) == "model"
    with pytest.raises(ConfigError, match="model .*outside the workspace"):
        workspace.model_name(str(tmp_path))
    (workspace.root / "demo").write_text("")  # a file of the bundled set's name: the user's file wins
    assert workspace.data_path("demo") == "demo"


def wait_until(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def states(jobs: Jobs) -> list[str]:
    jobs.tick()
    return [job.state for job in jobs.all()]


def test_jobs_run_one_at_a_time_in_order(workspace):
    jobs = Jobs(workspace, program=WAITER)
    first = jobs.submit(["a.done", "go"], "a.done")
    second = jobs.submit(["b.done", "a.done"], "b.done")  # would end at once if it started before the first ends
    assert states(jobs) == [RUNNING, QUEUED]
    (workspace.root / "go").touch()
    wait_until(lambda: states(jobs) == [FINISHED, FINISHED])
    a, b = jobs.get(first.id), jobs.get(second.id)
    assert a.ended <= b.started and a.returncode == b.returncode == 0
    assert a.command == "tuneforge a.done go"


def test_stop_a_queued_job_and_a_running_one(workspace):
    jobs = Jobs(workspace, program=SLEEPER)
    running = jobs.submit(["a.done", "60"], "a.done")
    queued = jobs.submit(["b.done", "0"], "b.done")
    assert jobs.stop(queued.id).state == STOPPED
    assert jobs.stop(running.id).state == STOPPED

    def ended() -> bool:
        jobs.tick()
        return jobs.get(running.id).ended is not None

    wait_until(ended)
    assert not alive(jobs.get(running.id).pid)
    assert [job.state for job in jobs.all()] == [STOPPED, STOPPED]
    assert not (workspace.root / "a.done").exists() and not (workspace.root / "b.done").exists()


def test_a_restarted_studio_finds_its_running_job_and_starts_the_queue_after_it(workspace):
    before = Jobs(workspace, program=WAITER)
    running = before.submit(["a.done", "go"], "a.done")
    queued = before.submit(["b.done", "a.done"], "b.done")
    child = before._children[running.id]
    after = Jobs(workspace, program=WAITER)  # a new studio: the first job is not its child
    assert states(after) == [RUNNING, QUEUED]
    (workspace.root / "go").touch()
    child.wait()  # (its parent, the old studio, reaps it; the new one sees the pid gone)
    wait_until(lambda: states(after) == [FINISHED, FINISHED])
    assert after.get(queued.id).started >= after.get(running.id).ended - 1


def test_a_failing_job_is_failed_and_its_log_kept(workspace):
    jobs = Jobs(workspace, program=[sys.executable, "-c", "import sys; print('broken: line 3'); sys.exit(2)",
                                    "tuneforge"])
    job = jobs.submit(["x"], "x")
    wait_until(lambda: states(jobs) == [FAILED])
    assert jobs.get(job.id).returncode == 2 and "broken: line 3" in jobs.tail(job.id)


def make_run(folder: Path, finished: bool, steps: int = 3, lock_pid: int | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": "x", "finished": finished}))
    (folder / "tuneforge.yaml").write_text("method: lora\nobjective: sft\nmodel: m\nmax_steps: 3\n")
    lines = [json.dumps({"step": 0, "eval_loss": 3.0})] + [json.dumps({"step": s, "loss": 3.0 - s, "lr": 0.1})
                                                            for s in range(1, steps + 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 9, \"lo")  # a line being written
    if lock_pid is not None:
        (folder / ".lock").write_text(f"pid {lock_pid}\n")
    return folder


def test_runs_are_read_back_from_their_folders(workspace):
    sleeper = subprocess.Popen([*SLEEPER, "x", "60"], cwd=workspace.root)
    try:
        make_run(workspace.root / "runs" / "done", True)
        make_run(workspace.root / "runs" / "live", False, steps=1, lock_pid=sleeper.pid)
        make_run(workspace.root / "runs" / "killed", False, steps=2, lock_pid=2**22 + 1)
        (workspace.root / "runs" / "done" / "checkpoint-1").mkdir()  # inside a run: not a run
        found = {workspace.relative(f): run_info(workspace, f) for f in find_runs(workspace)}
        assert set(found) == {"runs/done", "runs/live", "runs/killed"}
        assert found["runs/done"].state == "finished" and found["runs/done"].progress == "3/3"
        assert found["runs/done"].loss == 0.0 and found["runs/done"].method == "lora"
        assert found["runs/live"].state == "running" and found["runs/killed"].state == "stopped"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_chart_series_are_long_format_points():
    records = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.5, "lr": 0.1, "flag": True}]
    assert series(records, ("loss", "eval_loss")) == [{"step": 0, "value": 3.0, "series": "eval_loss"},
                                                      {"step": 1, "value": 2.5, "series": "loss"}]


def test_the_key_comes_from_the_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert read_key(None) is None
    monkeypatch.setenv(KEY_ENV, "from-env")
    assert read_key(None) == "from-env"
    (tmp_path / "key").write_text("from-file\nignored\n")
    assert read_key(str(tmp_path / "key")) == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="first line is empty"):
        read_key(str(tmp_path / "empty"))
    check = key_checker("from-file")
    assert check("anyone", "from-file") and not check("anyone", "from-fil") and not check("anyone", None)


def test_a_studio_with_a_key_refuses_requests_without_it(tmp_path):
    import urllib.error
    import urllib.parse
    import urllib.request

    from tuneforge.studio.server import create, launch

    studio, blocks = create(tmp_path)
    url = launch(blocks, port=None, key="s3cret", block=False)  # Gradio picks a free port
    try:
        assert url.startswith("http://127.0.0.1:")  # bound to this machine only
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "config")
        assert refused.value.code == 401
        wrong = urllib.parse.urlencode({"username": "me", "password": "guess"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "login", data=wrong)
        right = urllib.parse.urlencode({"username": "me", "password": "s3cret"}).encode()
        assert urllib.request.urlopen(url + "login", data=right).status == 200
    finally:
        studio.close()
        blocks.close()


def test_studio_refuses_a_missing_workspace(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        Workspace(tmp_path / "nowhere")


def test_the_studio_command_is_registered():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    out = subprocess.run([sys.executable, "-m", "tuneforge", "studio", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and "127.0.0.1" in out.stdout and "--key-file" in out.stdout
