"""`synth` against a real OpenAI-compatible HTTP server on loopback that can be scripted to fail.

Checks: retries on every transient failure, failures counted and never silently lost, resume after a job limit,
a torn line and a SIGKILL with each job written exactly once, filter counts, provenance, the bearer key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest

from tuneforge.prompting import (SynthConfig, TeacherClient, TeacherConfigError, TeacherRequestError,
                                 read_documents, read_topics, synthesize)
from tuneforge.commands import prompting as prompting_cli
from tuneforge.prompting.teacher import TeacherUnreachableError

API_KEY = "sk-test-SECRET-7f3a"

# A fault is None (answer normally), ("sleep", s) then answer, ("status", code, headers), ("malformed",),
# or ("content", text): a well-formed HTTP reply whose message is `text`.
Fault = tuple | None


def words(seed: str, n: int = 8) -> str:
    """Distinct pseudo-words per seed, so unrelated questions are never near-duplicates of each other."""
    digest = hashlib.sha256(seed.encode()).hexdigest()
    return " ".join(digest[i:i + 6] for i in range(0, 6 * n, 6))


def job_key(body: dict) -> str:
    """``topic#n`` (or ``file:passage-hash#n``) of a generation request; ``judge:<question>`` of a judge request."""
    system = body["messages"][0]["content"]
    user = body["messages"][-1]["content"]
    if "grader" in system:
        return "judge:" + re.search(r"Question:\n<<<\n(.*?)\n>>>", user, re.S).group(1)
    number = re.search(r"(?:example|question) number (\d+)", user).group(1)
    topic = re.search(r"Topic: (.*)", user)
    if topic:
        return f"{topic.group(1)}#{number}"
    passage = re.search(r'Passage from "(.*)":\n<<<\n(.*?)\n>>>', user, re.S)
    return f"{passage.group(1)}:{hashlib.sha1(passage.group(2).encode()).hexdigest()[:8]}#{number}"


def default_reply(key: str, body: dict) -> str:
    if key.startswith("judge:"):
        return '{"score": 9, "reason": "fine"}'
    reply = {"question": f"How does {words('q' + key)} work?", "answer": f"It works by {words('a' + key)}."}
    if "rejected" in body["messages"][-1]["content"]:
        reply["rejected"] = f"Nobody knows about {words('r' + key, 3)}."
    return "```json\n" + json.dumps(reply) + "\n```"


class TeacherServer:
    """An OpenAI chat-completions endpoint on 127.0.0.1:<free port>. ``faults(key, attempt)`` scripts failures."""

    def __init__(self, faults: Callable[[str, int], Fault] = lambda key, attempt: None,
                 reply: Callable[[str, dict], str] = default_reply):
        self.faults, self.reply = faults, reply
        self.requests: list[tuple[dict[str, str], dict]] = []
        self.attempts: Counter = Counter()
        self.lock = threading.Lock()
        self.delay = 0.0  # seconds every request waits first (to let a test kill a client mid-run)

    def __enter__(self) -> "TeacherServer":
        self.httpd = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def generation_keys(self) -> Counter:
        return Counter(job_key(body) for _, body in self.requests if not job_key(body).startswith("judge:"))


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out and hung up is part of the script, not an error


def _handler_for(server: TeacherServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                return self._send(404, b'{"error": "not found"}')
            key = job_key(body)
            with server.lock:
                server.requests.append((dict(self.headers), body))
                attempt = server.attempts[key]
                server.attempts[key] += 1
            time.sleep(server.delay)
            fault = server.faults(key, attempt)
            content = server.reply(key, body)
            if fault is not None and fault[0] == "sleep":
                time.sleep(fault[1])
            elif fault is not None and fault[0] == "status":
                return self._send(fault[1], b'{"error": "scripted"}', fault[2] if len(fault) > 2 else {})
            elif fault is not None and fault[0] == "malformed":
                return self._send(200, b'{"choices": [{"message": {"content": "truncat')
            elif fault is not None and fault[0] == "content":
                content = fault[1]
            reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}]}
            self._send(200, json.dumps(reply).encode())

        def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def client(server: TeacherServer, **kwargs) -> TeacherClient:
    options = dict(api_key=API_KEY, timeout=0.5, max_retries=3, concurrency=3, backoff_base=0.001, seed=0)
    return TeacherClient(server.url, "teacher-x", **{**options, **kwargs})


def topics_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "topics.txt"
    path.write_text("# topics\n" + "".join(f"t{i}\n" for i in range(n)) + "\n")
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_no_key_anywhere(tmp_path: Path, *texts: str) -> None:
    for text in texts:
        assert API_KEY not in text
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert API_KEY not in file.read_text(errors="replace"), file


# -- the client --------------------------------------------------------------------------------------


def test_client_retries_timeout_429_500_and_malformed_then_succeeds():
    script = [("sleep", 1.0), ("status", 429, {"Retry-After": "2"}), ("status", 500), ("malformed",), None]
    waits: list[float] = []
    with TeacherServer(lambda key, attempt: script[attempt]) as server:
        teacher = client(server, timeout=0.3, max_retries=5, sleep=waits.append)
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Topic: a\nexample number 1"}]
        content = teacher.complete(messages, temperature=0.5, max_tokens=9)
    assert json.loads(content.strip("`json\n"))["question"].startswith("How does")
    assert len(server.requests) == 5 and teacher.retries == 4 and len(waits) == 4
    assert waits[1] >= 2.0  # Retry-After honoured
    assert all(w < 1.0 for i, w in enumerate(waits) if i != 1)  # otherwise short exponential backoff
    headers, body = server.requests[0]
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert body == {"model": "teacher-x", "messages": messages, "temperature": 0.5, "max_tokens": 9}
    assert API_KEY not in repr(teacher)


def test_client_reports_exhausted_retries_in_place_and_loses_nothing():
    with TeacherServer(lambda key, attempt: ("status", 503) if key == "t2#1" else None) as server:
        teacher = client(server, max_retries=2)
        prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": f"Topic: t{i}\nexample number 1"}]
                   for i in range(5)]
        results = teacher.complete_many(prompts)
        teacher.close()
    assert isinstance(results[2], TeacherRequestError) and "HTTP 503" in str(results[2])
    assert all(isinstance(r, str) and words("qt%d#1" % i) in r for i, r in enumerate(results) if i != 2)
    assert server.attempts["t2#1"] == 3  # one try + max_retries


def test_client_stops_on_a_rejected_key_without_printing_it():
    with TeacherServer(lambda key, attempt: ("status", 401)) as server:
        teacher = client(server)
        with pytest.raises(TeacherConfigError, match="401") as e:
            teacher.complete([{"role": "system", "content": "s"},
                              {"role": "user", "content": "Topic: a\nexample number 1"}])
    assert API_KEY not in str(e.value)
    assert len(server.requests) == 1  # no retry can fix a wrong key


# -- synthesize ------------------------------------------------------------------------------------------


def test_synth_counts_failures_and_drops_then_a_rerun_retries_only_the_failed(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    same_as_t0 = json.dumps({"question": f"How does {words('qt0#1')} work?", "answer": "A different answer."})
    near_t0 = json.dumps({"question": f"how does {words('qt0#1')} works??", "answer": "Another answer."})
    faults = {
        "t0#1": lambda a: ("status", 429, {"Retry-After": "0"}) if a == 0 else None,
        "t1#1": lambda a: ("status", 500),  # fails for good in the first run
        "t2#1": lambda a: ("content", "Sorry, I cannot help with that."),
        "t3#1": lambda a: ("content", same_as_t0),
        "t4#1": lambda a: ("content", near_t0),
        "t5#1": lambda a: ("sleep", 1.0) if a == 0 else None,
    }
    fault = lambda key, attempt: faults[key](attempt) if key in faults else None
    sources = read_topics(topics_file(tmp_path, 6))
    config = SynthConfig(output=tmp_path / "out" / "synth.jsonl", count=6)
    with TeacherServer(fault) as server:
        teacher = client(server, max_retries=2, timeout=0.4)
        first = synthesize(sources, teacher, config)
        faults["t1#1"] = lambda a: None  # the server recovers
        second = synthesize(sources, client(server), config)

    assert (first.attempted, first.generated, first.failed, first.kept) == (6, 5, 1, 2)
    assert first.dropped == {"format": 1, "length": 0, "answer_format": 0, "judge": 0, "duplicate_exact": 1,
                             "duplicate_near": 1}
    assert first.failed_jobs[0]["error"].startswith("gave up after 3 attempts") and first.status == "incomplete"
    assert first.retries >= 1 + 2 + 1  # t0's 429, t1's two retries, t5's timeout
    assert json.loads((tmp_path / "out" / "synth.summary.json").read_text())["failed"] == 0  # the second run's

    assert (second.already_done, second.attempted, second.kept, second.failed, second.status) == (
        5, 1, 1, 0, "complete")
    records = read_output(config.output)
    assert sorted(r["meta"]["source"]["topic"] for r in records) == ["t0", "t1", "t5"]
    assert len({r["meta"]["job_id"] for r in records}) == 3
    assert server.generation_keys()["t2#1"] == 1  # a dropped job is not asked again on resume
    for r in records:
        assert set(r) == {"instruction", "input", "output", "meta"}
        assert r["meta"]["teacher"] == {"kind": "http", "url": server.url + "/chat/completions", "model": "teacher-x"}
        assert r["meta"]["template"] == "synth_topic" and r["meta"]["judge_score"] is None
    ledger = read_output(config.jobs_path)
    assert Counter(e["filter"] for e in ledger) == {"format": 1, "duplicate_exact": 1, "duplicate_near": 1}
    assert any("cannot help" in e["reply"] for e in ledger)  # the dropped reply is kept for inspection
    assert_no_key_anywhere(tmp_path, caplog.text)


def test_resume_after_a_job_limit_and_a_torn_last_line_writes_each_job_once(tmp_path, caplog):
    sources = read_topics(topics_file(tmp_path, 10))
    config = SynthConfig(output=tmp_path / "synth.jsonl", count=10, max_jobs=4)
    with TeacherServer() as server:
        first = synthesize(sources, client(server), config)
        with config.output.open("a") as f:
            f.write('{"instruction": "half a rec')  # what a kill in the middle of a write leaves
        config.max_jobs = None
        with caplog.at_level(logging.WARNING):
            second = synthesize(sources, client(server), config)
    assert (first.kept, first.remaining, first.status) == (4, 6, "incomplete")
    assert "half-written" in caplog.text and second.repaired_bytes == len('{"instruction": "half a rec')
    assert (second.already_done, second.kept, second.total_in_output, second.remaining) == (4, 6, 10, 0)
    records = read_output(config.output)
    assert len(records) == 10 and len({r["meta"]["job_id"] for r in records}) == 10
    assert max(server.generation_keys().values()) == 1  # no job was asked for twice


def test_a_killed_run_resumes_and_each_job_lands_exactly_once(tmp_path):
    output = tmp_path / "synth.jsonl"
    topics = topics_file(tmp_path, 12)
    code = ("import argparse, sys\nfrom tuneforge.commands.prompting import add_subcommands\n"
            "p = argparse.ArgumentParser(); add_subcommands(p.add_subparsers())\n"
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n")
    with TeacherServer() as server:
        args = ["synth", "--topics", str(topics), "--output", str(output), "--teacher-url", server.url,
                "--teacher-model", "teacher-x", "--concurrency", "1", "--timeout", "5"]
        server.delay = 0.15
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if output.exists() and output.read_text().count("\n") >= 3:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the run finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=10)
        done_before = len(read_output(output))
        assert 3 <= done_before < 12
        server.delay = 0.0
        parsed = parser().parse_args(args)
        assert parsed.func(parsed) == 0
    records = read_output(output)
    assert len(records) == 12 and len({r["meta"]["job_id"] for r in records}) == 12


def test_filters_length_answer_format_and_judge(tmp_path):
    answers = {"t0": {"ok": True}, "t1": "{}", "t2": "not json at all", "t3": '{"ok": false}', "t4": '{"n": 1}',
               "t5": '[1, 2]'}
    judge = {"t0": '{"score": 9, "reason": "good"}', "t3": "Score: 3/10", "t4": "I rate it 8/10.",
             "t5": "looks fine to me"}

    def reply(key: str, body: dict) -> str:
        topic = re.search(r"about (t\d)", key).group(1) if key.startswith("judge:") else key.split("#")[0]
        if key.startswith("judge:"):
            return judge[topic]
        return json.dumps({"question": f"Question about {topic}: {words(topic)}?", "answer": answers[topic]})

    config = SynthConfig(output=tmp_path / "s.jsonl", answer_format="json", min_answer_chars=3, judge_threshold=7)
    with TeacherServer(reply=reply) as server:
        summary = synthesize(read_topics(topics_file(tmp_path, 6)), client(server), config)
    assert summary.dropped == {"format": 0, "length": 1, "answer_format": 1, "judge": 2, "duplicate_exact": 0,
                               "duplicate_near": 0}
    records = {r["meta"]["source"]["topic"]: r for r in read_output(config.output)}
    assert set(records) == {"t0", "t4"}
    assert json.loads(records["t0"]["output"]) == {"ok": True}  # a JSON value, not a string, is kept as JSON
    assert records["t0"]["meta"]["judge_score"] == 9 and records["t4"]["meta"]["judge_score"] == 8
    judged = [key for key in (job_key(b) for _, b in server.requests) if key.startswith("judge:")]
    assert len(judged) == 4  # the judge sees only records that passed the cheap filters


def test_preference_pairs_are_written_and_read_back_by_the_data_loader(tmp_path):
    from tuneforge.data.formats import load_examples

    def reply(key: str, body: dict) -> str:
        if key == "t1#1":
            return json.dumps({"question": "Same answers?", "answer": "Yes.", "rejected": "yes"})
        return default_reply(key, body)

    config = SynthConfig(output=tmp_path / "pref.jsonl", format="preference", count=3)
    with TeacherServer(reply=reply) as server:
        summary = synthesize(read_topics(topics_file(tmp_path, 3)), client(server), config)
    assert summary.kept == 2 and summary.dropped["format"] == 1  # rejected == chosen is no preference
    assert "rejected" in server.requests[0][1]["messages"][-1]["content"]  # the teacher was asked for one
    records = read_output(config.output)
    assert all(set(r) == {"prompt", "chosen", "rejected", "meta"} and r["chosen"] != r["rejected"] for r in records)
    assert [e.kind for e in load_examples(config.output)] == ["preference", "preference"]
    with pytest.raises(ValueError, match="already holds preference records"):
        synthesize(read_topics(topics_file(tmp_path, 3)), client(server), SynthConfig(output=config.output))


def test_documents_are_chunked_and_each_record_names_its_file_and_chunk(tmp_path):
    from tuneforge.data.formats import load_examples

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "guide.md").write_text("# Guide\n\n" + "\n\n".join(f"Paragraph {i}: " + "word " * 30 for i in range(4)))
    (docs / "sub" / "notes.txt").write_text("Short notes about the widget.")
    (docs / "ignored.bin").write_text("not a document")
    sources = read_documents(docs, chunk_chars=200)
    assert [(s.provenance["file"], s.provenance["chunk"]) for s in sources] == [
        ("guide.md", 0), ("guide.md", 1), ("guide.md", 2), ("guide.md", 3), ("sub/notes.txt", 0)]
    config = SynthConfig(output=tmp_path / "docs.jsonl", include_context=True)
    with TeacherServer() as server:
        summary = synthesize(sources, client(server), config)
    assert summary.kept == 5
    records = read_output(config.output)
    for record, source in zip(records, sources):
        assert record["meta"]["source"] == source.provenance
        assert record["input"] == source.variables["context"]  # --include-context
        assert record["meta"]["template"] == "synth_document"
    prompts = [b["messages"][-1]["content"] for _, b in server.requests]
    assert any("Short notes about the widget." in p and 'Passage from "sub/notes.txt"' in p for p in prompts)
    assert len(load_examples(config.output)) == 5  # alpaca records `tuneforge train` reads


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge")
    prompting_cli.add_subcommands(p.add_subparsers(dest="command"))
    return p


def test_cli_synth_over_http_reads_the_key_from_the_env_and_never_prints_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MY_TEACHER_KEY", API_KEY)
    output = tmp_path / "data" / "synth.jsonl"
    with TeacherServer() as server:
        args = parser().parse_args([
            "synth", "--topics", str(topics_file(tmp_path, 2)), "--count", "4", "--output", str(output),
            "--teacher-url", server.url, "--teacher-model", "teacher-x", "--api-key-env", "MY_TEACHER_KEY",
            "--concurrency", "2", "--judge-threshold", "5"])
        assert args.func(args) == 0
    assert {h["Authorization"] for h, _ in server.requests} == {f"Bearer {API_KEY}"}
    captured = capsys.readouterr()
    assert "kept 4" in captured.out and "synth.summary.json" in captured.out
    summary = json.loads((tmp_path / "data" / "synth.summary.json").read_text())
    assert summary["kept"] == 4 and summary["requests_sent"] == 8  # 4 generations + 4 judgements
    assert_no_key_anywhere(tmp_path, captured.out, captured.err)

    monkeypatch.delenv("MY_TEACHER_KEY")
    args = parser().parse_args(["synth", "--topics", str(topics_file(tmp_path, 2)), "--output", str(output),
                                "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m",
                                "--api-key-env", "MY_TEACHER_KEY"])
    assert args.func(args) == 2
    assert "MY_TEACHER_KEY" in capsys.readouterr().err


def test_cli_synth_exit_code_says_some_jobs_failed(tmp_path, capsys):
    with TeacherServer(lambda key, attempt: ("status", 500) if key == "t0#1" else None) as server:
        args = parser().parse_args([
            "synth", "--topics", str(topics_file(tmp_path, 2)), "--output", str(tmp_path / "s.jsonl"),
            "--teacher-url", server.url, "--teacher-model", "teacher-x", "--max-retries", "1"])
        # Backoff is real here (1 s base, jittered): one retry keeps the test short.
        assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "failed requests 1" in out and "rerun the same command" in out


# -- an unreachable teacher and settings that cannot work -----------------------------------------------


def refused_url() -> str:
    """An http URL on loopback where nothing listens: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_synth_stops_at_once_when_no_teacher_listens(tmp_path):
    # Before: every job spent its 6 attempts (72 requests for 12 jobs). Now one request's worth of attempts.
    teacher = TeacherClient(refused_url(), "teacher-x", max_retries=5, concurrency=4, backoff_base=0.001, seed=0)
    config = SynthConfig(output=tmp_path / "s.jsonl", count=12)
    with pytest.raises(TeacherUnreachableError, match="unreachable: 6 connection attempts in a row failed, and it "
                                                      "has not answered any request .*is the server running"):
        synthesize(read_topics(topics_file(tmp_path, 12)), teacher, config)
    teacher.close()
    assert 6 <= teacher.requests_sent <= 6 + 4  # the attempts in flight when it gave up may land too
    summary = json.loads(config.summary_path.read_text())
    assert summary["status"].startswith("aborted: TeacherUnreachableError") and summary["kept"] == 0


def test_a_short_outage_after_replies_is_retried_and_a_long_one_stops(monkeypatch):
    real_urlopen = urllib.request.urlopen
    down = {"calls": 0}  # while > 0: that many more connections are refused

    def urlopen(*args, **kwargs):
        if down["calls"] > 0:
            down["calls"] -= 1
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        return real_urlopen(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": f"Topic: t{i}\nexample number 1"}]
               for i in range(4)]
    with TeacherServer() as server:
        teacher = client(server, max_retries=3, concurrency=4)
        assert isinstance(teacher.complete(prompts[0]), str)  # the teacher has answered once
        down["calls"] = 4  # more failed connections in a row than one request may try, none exhausted
        assert all(isinstance(r, str) for r in teacher.complete_many(prompts))
        down["calls"] = 10 ** 6  # the server is gone: one request spends its retries, then everything stops
        with pytest.raises(TeacherUnreachableError, match="connection attempts in a row failed \\(last") as e:
            teacher.complete_many(prompts)
        teacher.close()
    assert "has not answered" not in str(e.value)


@pytest.mark.parametrize("url,options,message", [
    ("file:///etc/passwd", {}, "expected an http:// or https:// URL"),
    ("ftp://127.0.0.1/v1", {}, "expected an http:// or https:// URL"),
    ("http:///v1", {}, "with a host"),
    ("127.0.0.1:8000/v1", {}, "expected an http:// or https:// URL"),
    ("http://127.0.0.1:8000/v1", {"max_retries": -1}, "max retries must be a whole number >= 0"),
    ("http://127.0.0.1:8000/v1", {"timeout": 0}, "timeout must be > 0"),
])
def test_client_refuses_settings_that_cannot_work(url, options, message):
    with pytest.raises(ValueError, match=message):
        TeacherClient(url, "m", **options)


@pytest.mark.parametrize("flags,message", [
    (["--teacher-url", "file:///etc/hostname"], "expected an http:// or https:// URL"),
    (["--max-retries", "-1"], "max retries must be a whole number >= 0"),
    ([], "the teacher is unreachable"),
])
def test_cli_synth_bad_teacher_settings_exit_2_with_one_line(tmp_path, capsys, flags, message):
    args = ["synth", "--topics", str(topics_file(tmp_path, 12)), "--output", str(tmp_path / "s.jsonl"),
            "--teacher-url", refused_url(), "--teacher-model", "m", *flags]
    parsed = parser().parse_args(args)
    assert parsed.func(parsed) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.jsonl").exists() or not (tmp_path / "s.jsonl").read_text()


def test_a_rerun_with_other_settings_is_refused_and_overwrite_starts_over(tmp_path):
    """Resumed records must be what this command would write: other filters or another teacher are refused."""
    sources = read_topics(topics_file(tmp_path, 3))
    config = SynthConfig(output=tmp_path / "synth.jsonl", count=3, max_jobs=2)
    with TeacherServer() as server:
        synthesize(sources, client(server), config)
        changed = SynthConfig(output=config.output, count=3, max_answer_chars=10, temperature=0.2)
        with pytest.raises(ValueError, match=r"temperature 0.8 -> 0.2, max_answer_chars 4000 -> 10"):
            synthesize(sources, client(server), changed)
        assert len(read_output(config.output)) == 2  # untouched by the refused run
        changed.overwrite = True
        summary = synthesize(sources, client(server), changed)
    assert summary.already_done == 0 and summary.total_in_output == 0  # started over, nothing reused


def test_synth_refuses_to_append_to_data_it_did_not_write_or_to_its_own_input(tmp_path, capsys):
    mine = tmp_path / "train.jsonl"
    mine.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    with TeacherServer() as server:
        with pytest.raises(ValueError, match="did not write"):
            synthesize(read_topics(topics_file(tmp_path, 2)), client(server), SynthConfig(output=mine))
    assert mine.read_text().count("\n") == 1
    topics = topics_file(tmp_path, 2)
    args = parser().parse_args(["synth", "--topics", str(topics), "--output", str(topics), "--teacher-url",
                                "http://127.0.0.1:9/v1", "--teacher-model", "m"])
    assert args.func(args) == 2 and "input" in capsys.readouterr().err
    assert topics.read_text().startswith("# topics")
