"""Fault injection against `tuneforge serve` in a subprocess: clients that hang up mid-request, bodies far over the
limit (declared and streamed in), bodies that trickle in (slowloris), a flood beyond --max-queue. Meanwhile and after,
an honest client waits seconds at most and the server's memory stays bounded; SIGTERM then ends it within seconds
although a long generation is running."""

from __future__ import annotations

import concurrent.futures
import select
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

# A live server process started for the module (~60 s with the fault test) and driven over sockets: end to end.
pytestmark = pytest.mark.slow

LIMIT = 64 * 1024
MiB = 1 << 20
FLAGS = ["--base-name", "base", "--max-queue", "4", "--max-batch-size", "2", "--max-body-bytes", str(LIMIT),
         "--body-timeout", "1", "--default-max-tokens", "16", "--shutdown-timeout", "1"]


@pytest.fixture(scope="module")
def server(endless_model_dir, serve_process):
    with serve_process(endless_model_dir, *FLAGS) as live:
        yield live


def completion(server, timeout: float = 30, **body) -> httpx.Response:
    return httpx.post(f"{server.base}/v1/completions", timeout=timeout,
                      json={"model": "base", "prompt": "hi", "temperature": 0, **body})


def assert_honest_requests_answer_quickly(server) -> None:
    started = time.monotonic()
    assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 2
    started = time.monotonic()
    assert completion(server, max_tokens=2).status_code == 200
    assert time.monotonic() - started < 10


def raw_post(server, headers: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n"
                 .encode())
    return sock


def hang_up_mid_request(server, stream: bool) -> None:
    body = {"model": "base", "prompt": "hi", "max_tokens": 20000, "stream": stream}
    try:
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=0.5) as response:
            next(response.iter_lines())  # the first event, then gone
    except httpx.TimeoutException:
        pass  # a non-streaming client that stopped waiting


def hang_up_mid_body(server) -> None:
    with raw_post(server, "Content-Length: 1000\r\n") as sock:
        sock.sendall(b'{"model": "base", "prompt": "')  # and gone


def hold_a_slot(server, seconds: float) -> str:
    """A request for a long answer whose client gives up after ``seconds`` (the server then cancels it)."""
    try:
        return f"answered {completion(server, timeout=seconds, max_tokens=20000).status_code}"
    except httpx.TimeoutException:
        return "gave up"


def flood_one(server, i: int) -> int:
    """One request of a flood, through httpx or the official client; its status."""
    if i % 2:
        return completion(server, timeout=60, max_tokens=8).status_code
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        client.completions.create(model="base", prompt="hi", max_tokens=8, temperature=0)
    except openai.RateLimitError:
        return 429
    return 200


def declared_too_large(server) -> bytes:
    with raw_post(server, f"Content-Length: {50 * MiB}\r\n") as sock:  # refused before a byte of it is read
        return sock.recv(65536)


def streamed_too_large(server) -> bytes:
    """Chunked 64 KiB pieces, up to 50 MiB, until the server answers."""
    with raw_post(server, "Transfer-Encoding: chunked\r\n") as sock:
        piece = b"%x\r\n" % (64 * 1024) + b"a" * (64 * 1024) + b"\r\n"
        for _ in range(50 * 16):
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(piece)
            except OSError:  # the server answered and closed while we sent
                break
        return sock.recv(65536)


def trickle(server, seconds: float) -> bytes:
    """Declares 1000 bytes and sends one every 0.1 s; returns the answer."""
    with raw_post(server, "Content-Length: 1000\r\n") as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if select.select([sock], [], [], 0.1)[0]:
                sock.setblocking(True)
                return sock.recv(65536)
            try:
                sock.send(b" ")
            except OSError:
                break
        sock.setblocking(True)
        sock.settimeout(2)
        return sock.recv(65536)


def test_faults_cost_an_honest_client_seconds_and_the_server_bounded_memory(server):
    assert_honest_requests_answer_quickly(server)  # warm: first-request allocations are not growth
    baseline = server.rss_bytes()
    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        # Clients that hang up, streaming or not, while their 20000-token answers generate.
        list(pool.map(lambda i: hang_up_mid_request(server, stream=i % 2 == 0), range(8)))
        list(pool.map(lambda _: hang_up_mid_body(server), range(4)))
        # Bodies far over the limit: declared, and streamed in without a length.
        for answer in pool.map(lambda _: declared_too_large(server), range(8)):
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        for answer in pool.map(lambda _: streamed_too_large(server), range(4)):
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # Slow bodies: answered 408 after --body-timeout (1 s); /health answers meanwhile.
        slow = [pool.submit(trickle, server, 10) for _ in range(8)]
        time.sleep(0.3)
        started = time.monotonic()
        assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
        for future in slow:
            assert future.result(timeout=15).startswith(b"HTTP/1.1 408")
        # A flood while every slot is held: long answers, one after another, until a batch runs and --max-queue (4)
        # wait behind it (their clients give up after 8 s, which cancels them); then each of the 24 requests that
        # come is refused at once. (A flood of short answers made the count of 429s a race with finished batches.)
        held = []
        for _ in range(7):
            held.append(pool.submit(hold_a_slot, server, 8.0))
            time.sleep(0.2)
        time.sleep(0.5)
        started = time.monotonic()
        flood = list(pool.map(lambda i: flood_one(server, i), range(24)))
        refused_within = time.monotonic() - started
        outcomes = [future.result(timeout=30) for future in held]
    assert set(outcomes) <= {"gave up", "answered 429"} and outcomes.count("gave up") >= 5, outcomes
    assert flood == [429] * 24 and refused_within < 6, (flood, refused_within)
    assert_honest_requests_answer_quickly(server)
    growth = server.rss_bytes() - baseline
    assert growth < 200 * MiB, f"the server grew by {growth / MiB:.0f} MiB"


def test_sigterm_during_a_long_generation_exits_within_seconds(server):
    """Before: the server waited for the generation to end (minutes for a long one)."""
    body = {"model": "base", "prompt": "hi", "max_tokens": 30000, "temperature": 0, "stream": True}
    generating = threading.Event()

    def stream():
        try:
            with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if '"text": "' in line and '"text": ""' not in line:
                        generating.set()
        except httpx.HTTPError:
            pass  # the server went away mid-stream, as it should

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert generating.wait(60), "the generation did not start"
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=30)
    assert time.monotonic() - started < 10, server.log()
    client.join(timeout=10)
