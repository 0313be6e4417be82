"""Every bad request gets the right status and an OpenAI-shaped error body; auth; the bounded queue's 429;
adapters added and removed at runtime; a disconnecting client cancels its generation."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

AUTH = {"Authorization": "Bearer test-key"}
CHAT = {"model": "lora-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


def post(server, path: str, body=None, headers=AUTH, content: bytes | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=body if content is None else None, content=content,
                      headers={**headers, "Content-Type": "application/json"}, timeout=60)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_unknown_model_is_404(server, client):
    assert_openai_error(post(server, "/chat/completions", {**CHAT, "model": "nope"}), 404, "model_not_found", "model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_malformed_json_is_400(server):
    error = assert_openai_error(post(server, "/chat/completions", content=b'{"model": "lora-a", "messages": ['),
                                400, "invalid_json")
    assert "JSON" in error["message"]


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.5}, "temperature"),
    ({"temperature": 1e9}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 3}, "top_p"), ({"n": 0}, "n"),
    ({"n": 10_000}, "n"), ({"seed": -3}, "seed"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"), ({"logprobs": True, "stream": True}, "stream"), ({"echo": True}, None),
    ({"top_k": -2}, "top_k"), ({"top_k": 1.0}, "top_k"), ({"model": None}, "model"),
])
def test_bad_parameters_are_400(server, change, param):
    error = assert_openai_error(post(server, "/chat/completions", {**CHAT, **change}), 400)
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": "4"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 4.0}, "max_tokens"),
    ({"max_completion_tokens": "4"}, "max_completion_tokens"), ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_p": "1"}, "top_p"), ({"n": "2"}, "n"), ({"n": True}, "n"),
    ({"seed": "7"}, "seed"), ({"stream": "true"}, "stream"), ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
])
def test_values_of_the_wrong_type_are_400_not_coerced(server, change, param):
    error = assert_openai_error(post(server, "/chat/completions", {**CHAT, **change}), 400)
    assert error["param"] == param, error


def test_token_ids_of_the_wrong_type_are_400(server):
    for prompt in ([5, "6"], [5, True], [5, 6.0], [[5], [True]], [[5], "6"], [[]], [], [""]):
        assert_openai_error(post(server, "/completions", {"model": "base", "prompt": prompt}), 400)


def test_ints_are_numbers_as_openai_takes_them(client):
    out = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         temperature=0, top_p=1)
    assert out.usage.completion_tokens >= 1


def test_prompt_plus_max_tokens_beyond_context_is_400(server, client):
    # The tiny model's context is 256 positions.
    assert_openai_error(post(server, "/chat/completions", {**CHAT, "max_tokens": 250}), 400,
                        "context_length_exceeded")
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt=long_prompt, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    # A prompt adapter's virtual tokens count too: 4 of them.
    prompt_ids = list(range(5, 5 + 250))
    assert post(server, "/completions", {"model": "base", "prompt": prompt_ids, "max_tokens": 4,
                                         "temperature": 0}).status_code == 200
    assert_openai_error(post(server, "/completions", {"model": "prompt", "prompt": prompt_ids, "max_tokens": 4}),
                        400, "context_length_exceeded")


def test_bad_token_ids_are_400(server):
    assert_openai_error(post(server, "/completions", {"model": "base", "prompt": [1, 10**9]}), 400, param="prompt")


def test_missing_or_wrong_bearer_token_is_401(server):
    assert_openai_error(post(server, "/chat/completions", CHAT, headers={}), 401, "invalid_api_key")
    assert_openai_error(post(server, "/chat/completions", CHAT, headers={"Authorization": "Bearer wrong"}), 401,
                        "invalid_api_key")
    # Checked before the body is read: a malformed body without a key is still 401.
    assert_openai_error(post(server, "/chat/completions", content=b"{", headers={}), 401)
    assert httpx.get(server.url + "/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()


def test_admin_adds_and_removes_adapters_at_runtime(server, client, adapter_dirs):
    path = str(adapter_dirs["lora-b"])
    before = client.chat.completions.create(model="lora-b", messages=CHAT["messages"], max_tokens=4, temperature=0)
    added = post(server, "/admin/adapters", {"name": "lora-b-copy", "path": path})
    assert added.status_code == 201 and added.json()["id"] == "lora-b-copy"
    copy = client.chat.completions.create(model="lora-b-copy", messages=CHAT["messages"], max_tokens=4, temperature=0)
    assert copy.choices[0].message.content == before.choices[0].message.content
    assert_openai_error(post(server, "/admin/adapters", {"name": "lora-b-copy", "path": path}), 400)
    assert_openai_error(post(server, "/admin/adapters", {"name": "x", "path": "/does/not/exist"}), 400)
    assert httpx.delete(server.url + "/admin/adapters/lora-b-copy", headers=AUTH, timeout=10).status_code == 200
    assert "lora-b-copy" not in [m.id for m in client.models.list()]
    assert_openai_error(httpx.delete(server.url + "/admin/adapters/lora-b-copy", headers=AUTH, timeout=10), 404)
    assert httpx.post(server.url + "/admin/adapters", json={"name": "y", "path": path}, timeout=10).status_code == 401


@pytest.fixture
def small_queue_server(tiny_model_dir, adapter_dirs, live_server):
    from tuneforge.inference.loading import load_for_inference
    from tuneforge.serve.app import create_app

    model, tokenizer, _ = load_for_inference(str(tiny_model_dir), None)
    app = create_app(model, tokenizer, "base", {"lora-a": str(adapter_dirs["lora-a"])}, max_queue=2,
                     max_batch_size=1)
    with live_server(app) as live:
        yield live


def test_full_queue_is_429_and_queued_requests_still_answer(small_queue_server):
    server, scheduler = small_queue_server, small_queue_server.app.state.scheduler
    body = {**CHAT, "max_tokens": 3}
    scheduler.pause()  # nothing runs, so the queue fills deterministically
    results = []
    waiting = [threading.Thread(target=lambda: results.append(post(server, "/chat/completions", body, headers={})))
               for _ in range(2)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 30
    while scheduler.queued() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.queued() == 2
    assert_openai_error(post(server, "/chat/completions", body, headers={}), 429, "rate_limit_exceeded")
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**body)
    scheduler.resume()
    for t in waiting:
        t.join(timeout=60)
    assert [r.status_code for r in results] == [200, 200]


def test_disconnected_client_cancels_generation(small_queue_server):
    server, scheduler = small_queue_server, small_queue_server.app.state.scheduler
    # A greedy answer that runs to the length limit (no stop token), so only a cancel can end it early.
    candidates = [{"model": model, "prompt": list(range(start, start + 10)), "max_tokens": 240, "temperature": 0}
                  for start in (5, 40, 80, 120) for model in ("lora-a", "base")]
    body = next((b for b in candidates
                 if post(server, "/completions", b, headers={}).json()["choices"][0]["finish_reason"] == "length"),
                None)
    assert body is not None, "no candidate prompt generates 240 tokens without a stop token"
    for pause in (True, False):  # hang up while the request waits, then while it generates
        if pause:
            scheduler.pause()
        before = scheduler.requests_cancelled
        with httpx.stream("POST", server.url + "/completions", json={**body, "stream": True}, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            if not pause:
                while scheduler.queued():  # the worker has taken it
                    time.sleep(0.005)
        scheduler.resume()
        deadline = time.monotonic() + 30
        while scheduler.requests_cancelled == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.requests_cancelled == before + 1, f"pause={pause}"


def corrupt_copy(source, target, **changes):
    import json
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize("changes, named", [
    ({"r": 0}, "r must be positive"), ({"r": None}, "r: Input should be a valid integer"),
    ({"r": "8"}, "r: Input should be a valid integer"), ({"lora_alpha": None}, "lora_alpha"),
    ({"lora_dropout": 2}, "lora_dropout"),
])
def test_admin_refuses_adapter_configs_with_bad_fields(server, adapter_dirs, tmp_path, changes, named):
    """Before: r 0 was a 500 ZeroDivisionError, r null a 500 TypeError."""
    bad = corrupt_copy(adapter_dirs["lora-b"], tmp_path / "bad", **changes)
    error = assert_openai_error(post(server, "/admin/adapters", {"name": "bad", "path": str(bad)}), 400,
                                param="path")
    assert named in error["message"] and str(bad) in error["message"], error


def test_admin_refuses_an_adapter_trained_on_another_base(server, other_base_adapter):
    error = assert_openai_error(post(server, "/admin/adapters", {"name": "other", "path": str(other_base_adapter)}),
                                400, param="path")
    assert "different base model" in error["message"]
    assert "other" not in [m["id"] for m in httpx.get(server.url + "/models", headers=AUTH, timeout=10).json()["data"]]


def test_adapter_trained_on_another_base_is_refused_at_start(tiny_model_dir, other_base_adapter):
    from tuneforge.inference.loading import load_for_inference
    from tuneforge.serve.app import create_app

    model, tokenizer, _ = load_for_inference(str(tiny_model_dir), None)
    with pytest.raises(ValueError, match="different base model"):
        create_app(model, tokenizer, "base", {"other": str(other_base_adapter)})


def test_admin_errors_name_the_problem_to_key_holders(server, tmp_path):
    error = assert_openai_error(post(server, "/admin/adapters", {"name": "x", "path": str(tmp_path / "nope")}), 400)
    assert "does not exist" in error["message"]
