"""A live server on loopback for the serve tests: a tiny Llama, two LoRA adapters of different ranks and targets,
and a prompt-tuning adapter, served by uvicorn in a thread on a port the OS picks; stopped after the module. Also
a tiny model that never stops generating (for cancellation, shutdown and fault tests) and `tuneforge serve` as a
subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")


def make_adapters(root: Path, model_dir: Path) -> dict[str, Path]:
    """Adapters with visible effects (random B / random prompt), saved as training saves them."""
    import tuneforge as tf
    from tuneforge.inference.loading import load_for_inference

    specs = {
        "lora-a": tf.LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
        "lora-b": tf.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                init_lora_weights=False),
        "prompt": tf.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="RANDOM"),
    }
    dirs = {}
    for i, (name, config) in enumerate(specs.items()):
        model, tokenizer, _ = load_for_inference(str(model_dir), None)
        torch.manual_seed(100 + i)
        handle = tf.attach(model, config)
        with torch.no_grad():  # make the update large enough to change greedy answers
            for _, p in handle.trainable_parameters():
                p.mul_(4.0)
        dirs[name] = handle.save(root / name, base_model_name_or_path=str(model_dir))
    return dirs


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread; ``url`` is its /v1 base."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn takes the bound socket (no race)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start within 30 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("adapters"), tiny_model_dir)


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dirs):
    """The shared server: base `base`, adapters lora-a, lora-b, prompt; API key `test-key`."""
    from tuneforge.inference.loading import load_for_inference
    from tuneforge.serve.app import create_app

    model, tokenizer, _ = load_for_inference(str(tiny_model_dir), None)
    app = create_app(model, tokenizer, "base", {k: str(v) for k, v in adapter_dirs.items()}, api_key="test-key",
                     max_queue=64, max_batch_size=8)
    with LiveServer(app) as live:
        yield live


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key="test-key", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def live_server():
    """The LiveServer class, for tests that need a server of their own (test modules cannot import conftest)."""
    return LiveServer


@pytest.fixture(scope="session")
def endless_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with a 32k context whose stop tokens never win greedy decoding (their output rows are zero,
    every other logit is random): a request runs to its max_tokens, so a long generation is long for sure."""
    from tuneforge.inference.generate import stop_token_ids
    from tuneforge.inference.loading import load_for_inference

    model, tokenizer, _ = load_for_inference(str(tiny_model_dir), None)
    with torch.no_grad():
        for token in stop_token_ids(tokenizer, model):
            model.lm_head.weight[token] = 0.0
    model.config.max_position_embeddings = 32768  # rotary positions: no weight depends on it
    path = tmp_path_factory.mktemp("endless")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`tuneforge serve MODEL_DIR ARGS` in a subprocess on a free loopback port, up once /health answers."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "tuneforge.commands.main", "serve", "--model", str(model_dir), "--port",
                    str(self.port), *args]
        # One intra-op thread, as in the test process: tiny models gain nothing from two, and OpenMP threads that
        # spin for a core the machine's other work holds make a token take seconds.
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        """The server process's resident memory, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def __enter__(self) -> "ServeProcess":
        # A file, not a pipe: a server logging every request would block once a pipe nobody reads is full.
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up within 90 s"
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.stderr.close()


@pytest.fixture(scope="module")
def serve_process():
    """The ServeProcess class (test modules cannot import conftest)."""
    return ServeProcess


@pytest.fixture(scope="session")
def other_base_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter that fits the tiny Llama's shapes but was trained on another tiny Llama (other weights): its
    record holds that model's fingerprint."""
    import tuneforge as tf
    from tuneforge.inference.loading import load_for_inference

    root = tmp_path_factory.mktemp("other-base")
    model, tokenizer, _ = load_for_inference(str(tiny_model_dir), None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    model, _, _ = load_for_inference(str(root / "model"), None)
    handle = tf.attach(model, tf.LoRAConfig(r=4, init_lora_weights=False))
    return handle.save(root / "adapter", base_model_name_or_path=str(root / "model"))
