"""``recommend --max-length auto``: the longest context per method and setup, from the long-context memory model; each
saver lengthens it, the answer fits the budget and one step more does not, context parallelism is offered only where
the heads divide, and bad requests are one line, exit 2."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from tuneforge.choose.long_context import (STEP, LongContextSetup, long_context_breakdown, longest_context,
                                           longest_contexts)
from tuneforge.choose.recommend import shape_from_config
from tuneforge.commands.main import main

LLAMA_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def shape():
    return shape_from_config(LLAMA_8B, "llama-3.1-8b", ("full", "lora", "qlora"))


def test_longest_context_fits_and_one_step_more_does_not(shape):
    setup = LongContextSetup(tiled_mlp=True)
    tokens = longest_context(shape, "qlora", 80 * 1024, setup)
    assert tokens % STEP == 0 and tokens > 0
    assert sum(long_context_breakdown(shape, "qlora", tokens, setup).values()) <= 80 * 1024 * 0.9
    assert sum(long_context_breakdown(shape, "qlora", tokens + STEP, setup).values()) > 80 * 1024 * 0.9


def test_each_saver_lengthens_the_context(shape):
    one = {s: longest_context(shape, "qlora", 80 * 1024, s) for s in (
        LongContextSetup(), LongContextSetup(tiled_mlp=True), LongContextSetup(tiled_mlp=True,
                                                                               offload_activations=True))}
    assert list(one.values()) == sorted(one.values()) and len(set(one.values())) == 3
    eight = longest_context(shape, "lora", 80 * 1024, LongContextSetup(8, 8))
    assert eight > 4 * longest_context(shape, "lora", 80 * 1024, LongContextSetup(8))  # the row is split 8 ways
    assert longest_context(shape, "full", 1024, LongContextSetup()) == 0  # 16 GB of weights in 1 GB: nothing fits


def test_context_parallel_rows_only_where_heads_divide(shape):
    rows = longest_contexts(shape, ["lora"], 80 * 1024, 3, heads=32)
    assert rows and not any("context parallel" in r["setup"] for r in rows)
    rows = longest_contexts(shape, ["lora"], 80 * 1024, 4, heads=32)
    assert any("context parallel 4" in r["setup"] for r in rows)


def test_cli_prints_the_table_and_a_command(tiny_model_dir, capsys):
    assert main(["recommend", "--model", str(tiny_model_dir), "--gpu-memory", "2GB", "--max-length", "auto",
                 "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "longest context" in out and "context parallel 2" in out
    assert "tuneforge train --model" in out and "--context-parallel 2" in out


@pytest.mark.parametrize("extra, message", [
    (["--max-length", "auto"], "--gpu-memory"),
    (["--max-length", "many", "--gpu-memory", "8GB"], "--max-length must be a positive integer"),
    (["--max-length", "auto", "--gpu-memory", "8GB", "--gpus", "0"], "--gpus must be a positive integer"),
])
def test_bad_requests_are_one_line(extra, message, tiny_model_dir, capsys):
    assert main(["recommend", "--model", str(tiny_model_dir), *extra]) == 2
    assert message in capsys.readouterr().err
