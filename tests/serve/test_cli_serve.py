"""`tuneforge serve` as a user starts it: a subprocess on loopback, answering the `openai` client, stopped after;
bad flags and adapters are one-line errors (exit 2) before anything serves. (SIGTERM: test_faults.py.)"""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from tuneforge.commands.main import main


def test_serve_subcommand_answers_and_requires_the_key(tiny_model_dir, adapter_dirs, serve_process):
    args = ["--base-name", "base", "--adapter", f"a={adapter_dirs['lora-a']}", "--adapter",
            f"p={adapter_dirs['prompt']}", "--max-batch-size", "4"]
    with serve_process(tiny_model_dir, *args, env={"TUNEFORGE_API_KEY": "from-env"}) as server:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="from-env", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["base", "a", "p"]
        out = client.chat.completions.create(model="p", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                             temperature=0)
        assert out.usage.completion_tokens >= 1
        assert httpx.get(f"{server.base}/v1/models", timeout=5).status_code == 401


@pytest.fixture
def started(monkeypatch):
    """Replaces uvicorn.run: records the app and options `serve` would run, instead of serving (and blocking)."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    return calls


def one_line_error(capsys, argv) -> str:
    """Runs `tuneforge ARGV`, which must fail as bad input does: exit 2 and one line on stderr."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    return err[-1]


@pytest.mark.parametrize("flag, value, expected", [
    ("--port", "99999", "0 to 65535"), ("--port", "-1", "0 to 65535"), ("--port", "http", "0 to 65535"),
    ("--dtype", "float8", "choose from"), ("--max-queue", "0", "positive"), ("--body-timeout", "-1", "positive"),
])
def test_bad_flags_are_clear_errors(capsys, started, tiny_model_dir, flag, value, expected):
    line = one_line_error(capsys, ["serve", "--model", str(tiny_model_dir), flag, value])
    assert flag in line and expected in line and not started


def corrupt_copy(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize("changes", [{"r": 0}, {"r": None}, {"r": "8"}, {"lora_alpha": None}])
def test_bad_adapter_config_is_one_line_error(capsys, started, tiny_model_dir, adapter_dirs, tmp_path, changes):
    bad = corrupt_copy(adapter_dirs["lora-a"], tmp_path / "bad", **changes)
    line = one_line_error(capsys, ["serve", "--model", str(tiny_model_dir), "--adapter", f"a={bad}"])
    assert line.startswith("tuneforge: error: ") and str(bad) in line and next(iter(changes)) in line
    assert not started


def test_missing_adapter_fails_before_the_model_loads(capsys, started, monkeypatch, tmp_path):
    import tuneforge.inference.loading

    loader = tuneforge.inference.loading
    monkeypatch.setattr(loader, "load_for_inference", lambda *a, **k: pytest.fail("loaded the model"))
    line = one_line_error(capsys, ["serve", "--model", "nowhere", "--adapter", f"a={tmp_path / 'nope'}"])
    assert "does not exist" in line


def test_adapter_of_another_base_is_refused_at_start(capsys, started, tiny_model_dir, other_base_adapter):
    line = one_line_error(capsys, ["serve", "--model", str(tiny_model_dir), "--adapter", f"a={other_base_adapter}"])
    assert "different base model" in line and not started


def test_api_key_from_file_and_bounded_shutdown(started, tiny_model_dir, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    (tmp_path / "key").write_text("from-file\n")
    assert main(["serve", "--model", str(tiny_model_dir), "--api-key-file", str(tmp_path / "key"),
                 "--shutdown-timeout", "3"]) == 0
    (app, options), = started
    assert options["timeout_graceful_shutdown"] == 3
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer from-file"}).status_code == 200
