"""A live server on loopback for the serve tests: a tiny Llama, two LoRA adapters of different ranks and targets,
and a prompt-tuning adapter, served by uvicorn in a thread on a port the OS picks; stopped after the module."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")


def make_adapters(root: Path, model_dir: Path) -> dict[str, Path]:
    """Adapters with visible effects (random B / random prompt), saved as training saves them."""
    import tuneforge as tf

    specs = {
        "lora-a": tf.LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
        "lora-b": tf.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                init_lora_weights=False),
        "prompt": tf.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="RANDOM"),
    }
    dirs = {}
    for i, (name, config) in enumerate(specs.items()):
        model, tokenizer, _ = tf.inference.load_for_inference(str(model_dir), None)
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
    from tuneforge.inference import load_for_inference
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
