"""Shared fixtures: tiny random-weight models of several architectures and a tokenizer built offline.

Nothing here downloads anything. The tokenizer is a byte-level BPE trained in a second on a small corpus;
models are built from configs (Llama-style with grouped-query attention, GPT-2 with Conv1D, Qwen2 with biases).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# float32 on every CPU, so that results do not depend on the machine's bf16 instructions (models.cpu_computes_bf16);
# set in the environment, so torchrun's worker processes get it too. tests/test_models.py checks the choice itself.
os.environ["TUNEFORGE_CPU_BF16"] = "0"
# Tiny models are dominated by per-op overhead, where one thread beats two (and never fights other processes).
torch.set_num_threads(1)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Convert the date to ISO format: March 5, 2021 -> 2021-03-05",
    "What is two plus three? The answer is five.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "0123456789 January February March April May June July August September October November December",
    "system user assistant instruction input output response question answer",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    return fast


@pytest.fixture(scope="session")
def tokenizer_source():
    """The tokenizer exactly as built (once per session: training it takes seconds). No test should change it; tests
    use ``tokenizer``."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_source):
    """The test tokenizer. A test may change it in place (a chat template, a pad token, added tokens, padding or
    truncation on the backend), and ``_pristine_tokenizer`` puts it back exactly as built before every test, so no
    result depends on which tests ran first. (It is one session-scoped object reset around every test, rather than a
    new copy per test, because module-scoped fixtures use it too; they, set up between two tests, see it as built.)"""
    return copy.deepcopy(tokenizer_source)


@pytest.fixture(autouse=True)
def _pristine_tokenizer(request):
    # Higher-scoped fixtures are set up first, so when the test uses ``tokenizer`` it already exists here.
    if "tokenizer" not in request.fixturenames:
        yield
        return
    shared, source = request.getfixturevalue("tokenizer"), request.getfixturevalue("tokenizer_source")
    reset_tokenizer(shared, source)
    yield
    reset_tokenizer(shared, source)


def reset_tokenizer(tokenizer, source) -> None:
    """Give ``tokenizer`` the whole state of a fresh copy of ``source`` (Python attributes and the Rust backend)."""
    fresh = copy.deepcopy(source)
    tokenizer.__dict__.clear()
    tokenizer.__dict__.update(fresh.__dict__)


def tiny_config(arch: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    raise ValueError(arch)


def make_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size)
    # The tokenizer's special ids (see SPECIAL): <|endoftext|> = 0 is BOS/EOS, <pad> = 3.
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 0, 3
    model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model.eval()


ARCHS = ["llama", "gpt2", "qwen2"]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tiny_model(arch, tokenizer):
    return make_tiny_model(arch, len(tokenizer))


def save_tiny_model_dir(path: Path, arch: str, tokenizer) -> Path:
    model = make_tiny_model(arch, len(tokenizer))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_source) -> Path:
    """A Llama-style tiny model saved as a Hugging Face directory (for CLI tests), with the tokenizer as built: not
    the shared one, whose state depends on the test that happens to create this directory."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama", copy.deepcopy(tokenizer_source))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A non-trivial LoRA adapter (random B) on the tiny model directory, recording that base."""
    import tuneforge

    model, _ = tuneforge.load_model(str(tiny_model_dir), device="cpu")
    torch.manual_seed(0)
    handle = tuneforge.attach(model, tuneforge.LoRAConfig(r=4, init_lora_weights=False))
    return handle.save(tmp_path_factory.mktemp("adapter"), base_model_name_or_path=str(tiny_model_dir))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int = 16) -> list[dict]:
    """A trivially learnable task: repeat a number in words."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return [{"instruction": f"Say {i % 10} in words.", "output": words[i % 10]} for i in range(n)]


@pytest.fixture
def sft_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", qa_rows())


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: tiny models then run several times faster (no OpenMP hand-off between
    threads, which costs most on a busy machine). Restores the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fit(model, handle, batch: dict, steps: int, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps of the method's trainable parameters on one batch; the token-mean losses, so a test
    can check that training reduces the loss."""
    from tuneforge.models.logprobs import token_cross_entropy_sum

    optimizer = torch.optim.AdamW([p for _, p in handle.trainable_parameters()], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss_sum, count = token_cross_entropy_sum(model, batch)
        optimizer.zero_grad()
        (loss_sum / count).backward()
        optimizer.step()
        losses.append(loss_sum.item() / count)
    return losses


def train_and_reload(tmp_path: Path, tokenizer, data: Path, method: str, options: dict):
    """Two trainer steps of ``method`` on a tiny Llama, then the saved adapter on a fresh copy of the base must give
    the trained model's logits exactly. Returns the training result."""
    import copy

    import tuneforge
    from tuneforge.methods import load_adapter

    config = tuneforge.load_config(None, {
        "data": str(data), "output": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2,
        "max_length": 64, "progress": False, "seed": 0, "warmup_steps": 0, "method": method,
        "method_options": options})
    result = tuneforge.train(config, make_tiny_model("llama", len(tokenizer)), copy.deepcopy(tokenizer))
    fresh = make_tiny_model("llama", len(tokenizer))
    load_adapter(fresh, tmp_path / "run")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, result.model(input_ids=ids).logits)
    return result
