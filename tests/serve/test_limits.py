"""What one client can cost the others is bounded: the body's size (413) and arrival time (408), the tokens a chat
request without max_tokens generates, a generation whose non-streaming client hung up (cancelled), tokenising (off
the event loop). And the admin routes: off without a key, and no path is revealed to a caller without one."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

LIMIT = 64 * 1024


def completion(url: str, timeout: float = 30, **body) -> httpx.Response:
    return httpx.post(f"{url}/completions", json={"model": "base", "prompt": "hi", "temperature": 0, **body},
                      timeout=timeout)


@pytest.fixture(scope="module")
def endless_server(endless_model_dir, live_server):
    """A server over the model that never stops by itself: no key, small limits, one row per batch."""
    from tuneforge.inference.loading import load_for_inference
    from tuneforge.serve.app import create_app

    model, tokenizer, _ = load_for_inference(str(endless_model_dir), None)
    app = create_app(model, tokenizer, "base", max_queue=4, max_batch_size=1, default_max_tokens=7,
                     max_body_bytes=LIMIT, body_timeout=1.0)
    with live_server(app) as live:
        yield live


def test_chat_without_max_tokens_stops_at_the_default(endless_server):
    out = httpx.post(f"{endless_server.url}/chat/completions", timeout=30,
                     json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["completion_tokens"] == 7  # before: the whole 32k context
    assert out.json()["choices"][0]["finish_reason"] == "length"


def test_default_max_tokens_never_passes_the_context(server):
    # The shared server: default 512 tokens, a 256-position context: the default shrinks to what the prompt leaves.
    out = httpx.post(f"{server.url}/chat/completions", headers={"Authorization": "Bearer test-key"}, timeout=60,
                     json={"model": "base", "messages": [{"role": "user", "content": "hi " * 60}], "temperature": 0})
    assert out.status_code == 200, out.text
    usage = out.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 256


def test_non_streaming_client_that_hangs_up_cancels_its_generation(endless_server):
    scheduler = endless_server.app.state.scheduler
    before = scheduler.requests_cancelled
    with pytest.raises(httpx.TimeoutException):  # the client gives up on a 30000-token answer after 0.5 s
        completion(endless_server.url, timeout=0.5, max_tokens=30000)
    deadline = time.monotonic() + 10
    while scheduler.requests_cancelled == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.requests_cancelled == before + 1  # before: it ran for minutes, everyone else queued behind
    started = time.monotonic()
    assert completion(endless_server.url, max_tokens=2).status_code == 200
    assert time.monotonic() - started < 10


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert response.headers.get("connection") == "close"


def test_body_over_the_limit_is_413_by_content_length_and_while_streaming_in(endless_server):
    big = b'{"model": "base", "prompt": "' + b"a" * (4 * LIMIT) + b'"}'
    headers = {"Content-Type": "application/json"}
    assert_refused(httpx.post(f"{endless_server.url}/completions", content=big, headers=headers, timeout=30), 413,
                   "request_too_large")

    def chunks():  # no Content-Length (chunked): refused once the bytes that arrived pass the limit
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    assert_refused(httpx.post(f"{endless_server.url}/completions", content=chunks(), headers=headers, timeout=30),
                   413, "request_too_large")
    # A body just under the limit is served (padded with JSON whitespace: a short prompt in a long body).
    fits = b'{"model": "base", "prompt": "hi", "max_tokens": 1' + b" " * (LIMIT - 100) + b"}"
    assert httpx.post(f"{endless_server.url}/completions", content=fits, headers=headers, timeout=30).status_code == 200


def raw_request(port: int, body: bytes, declared: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(declared).encode() + b"\r\n\r\n" + body)
    return sock


def test_body_that_trickles_in_is_408_after_the_body_timeout(endless_server):
    started = time.monotonic()
    sock = raw_request(endless_server.port, b'{"model": ', declared=1000)  # and nothing more
    with sock:
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"request_timeout" in answer
    assert time.monotonic() - started < 5  # the timeout is 1 s; before: the connection stayed open for ever


def test_tokenising_runs_off_the_event_loop(endless_server, monkeypatch):
    import tuneforge.serve.app as app_module

    entered, release = threading.Event(), threading.Event()
    real = app_module.prompt_ids

    def slow_prompt_ids(*args, **kwargs):  # a long prompt's tokenisation, held open until the test lets it go
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "prompt_ids", slow_prompt_ids)
    chat = threading.Thread(target=lambda: httpx.post(
        f"{endless_server.url}/chat/completions", timeout=30,
        json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}))
    chat.start()
    try:
        assert entered.wait(10)
        started = time.monotonic()
        assert httpx.get(f"{endless_server.url[:-3]}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2  # before: /health waited for the tokeniser
    finally:
        release.set()
        chat.join(timeout=30)


def test_admin_routes_are_off_without_a_key(endless_server, adapter_dirs):
    response = httpx.post(f"{endless_server.url}/admin/adapters", timeout=10,
                          json={"name": "a", "path": str(adapter_dirs["lora-a"])})
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    assert httpx.delete(f"{endless_server.url}/admin/adapters/a", timeout=10).status_code == 403
    assert "a" not in [m["id"] for m in httpx.get(f"{endless_server.url}/models", timeout=10).json()["data"]]


def test_docs_and_openapi_are_off(endless_server, server):
    for base in (endless_server.url[:-3], server.url[:-3]):
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert httpx.get(base + path, timeout=10).status_code == 404, path


@pytest.fixture(scope="module")
def keyless_admin_server(tiny_model_dir, live_server):
    from tuneforge.inference.loading import load_for_inference
    from tuneforge.serve.app import create_app

    model, tokenizer, _ = load_for_inference(str(tiny_model_dir), None)
    with live_server(create_app(model, tokenizer, "base", allow_admin_without_key=True)) as live:
        yield live


def test_admin_errors_reveal_no_path_without_a_key(keyless_admin_server, adapter_dirs, tmp_path):
    (tmp_path / "secret.txt").write_text("x")
    answers = set()
    for path in ["/does/not/exist", str(tmp_path), str(tmp_path / "secret.txt"), "/etc"]:
        response = httpx.post(f"{keyless_admin_server.url}/admin/adapters", json={"name": "x", "path": path},
                              timeout=10)
        assert response.status_code == 400
        answers.add(response.json()["error"]["message"])
    assert len(answers) == 1, answers  # one answer, whatever the path is or holds
    added = httpx.post(f"{keyless_admin_server.url}/admin/adapters", timeout=30,
                       json={"name": "a", "path": str(adapter_dirs["lora-a"])})
    assert added.status_code == 201  # the operator opted in: the route works
