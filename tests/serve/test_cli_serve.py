"""`tuneforge serve` as a user starts it: a subprocess on loopback, answering the `openai` client, stopped after."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subcommand_answers_and_requires_the_key(tiny_model_dir, adapter_dirs):
    port = free_port()
    env = {**os.environ, "TUNEFORGE_API_KEY": "from-env", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tuneforge.cli", "serve", "--model", str(tiny_model_dir), "--base-name", "base",
           "--adapter", f"a={adapter_dirs['lora-a']}", "--adapter", f"p={adapter_dirs['prompt']}",
           "--port", str(port), "--max-batch-size", "4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up within 90 s"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["base", "a", "p"]
        out = client.chat.completions.create(model="p", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                             temperature=0)
        assert out.usage.completion_tokens >= 1
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
