"""The README's demo block is what `tuneforge train` prints (issue 24: the quoted numbers had drifted). Runs the
whole bundled demo on the embedded SmolLM2 (~3 min on 2 quiet cores), so it is marked slow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tuneforge.commands.main import main

ROOT = Path(__file__).parents[1]
LOSS = re.compile(r"held-out eval, before -> after: loss ([\d.]+) -> ([\d.]+)")
EXACT = re.compile(r"held-out exact match: before ([\d.]+)% -> after ([\d.]+)%")


def quoted(text: str) -> tuple[tuple[float, float], tuple[float, float]]:
    loss, exact = LOSS.search(text), EXACT.search(text)
    assert loss and exact, "the demo block's two lines"
    return (float(loss[1]), float(loss[2])), (float(exact[1]), float(exact[2]))


def test_the_demo_yaml_and_the_readme_quote_one_number():
    readme = (ROOT / "README.md").read_text()
    _, (_, after) = quoted(readme)
    demo = (ROOT / "src" / "tuneforge" / "assets" / "demo" / "demo.yaml").read_text()
    assert f"reach {after}%" in demo


@pytest.mark.slow
def test_the_readme_demo_block_is_what_the_demo_prints(tmp_path, capsys):
    from tuneforge.models.loading import ModelNotFoundError, embedded_gguf_path

    try:  # not an import: the package's __init__ needs `llm`, which is not installed (--no-deps)
        embedded_gguf_path("smollm2-135m-instruct")
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    (loss_before, loss_after), (em_before, em_after) = quoted((ROOT / "README.md").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as `tuneforge train` runs (conftest pins one thread for the tiny models)
    try:
        assert main(["train", "--output", str(tmp_path / "demo"), "--progress", "false"]) == 0
    finally:
        torch.set_num_threads(threads)
    (got_loss_before, got_loss_after), (got_em_before, got_em_after) = quoted(capsys.readouterr().out)
    # The same arithmetic gives the same digits; another CPU's kernels (AVX2 / AVX512, a bf16 base where the CPU has
    # bf16 instructions) may move the last ones, and at most one of the 64 held-out answers.
    assert got_loss_before == pytest.approx(loss_before, rel=0.02)
    assert got_loss_after == pytest.approx(loss_after, rel=0.25)
    assert abs(got_em_before - em_before) <= 100 / 64 + 0.05 and abs(got_em_after - em_after) <= 100 / 64 + 0.05
