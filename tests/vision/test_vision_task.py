"""tuneforge learns from pixels: a colour-naming task goes from chance to >= 90% held-out exact match, while the
same run on blanked images (every image the same grey) stays at chance: the answers are not in the text."""

from __future__ import annotations

import json

import pytest
from tiny_vlm import COLOURS, colour_task

from tuneforge.commands.main import main


def held_out_exact_match(base, folder, blank: bool) -> dict:
    train, held_out = colour_task(folder, 64, seed=1, blank=blank), colour_task(folder, 24, seed=2, blank=blank)
    output = folder / "run"
    # Full fine-tuning of the language model (the random vision tower stays frozen): 24 steps of 8 records.
    code = main(["train", "--model", str(base), "--data", str(train), "--eval-data", str(held_out), "--output",
                 str(output), "--method", "full", "--max-steps", "24", "--batch-size", "8", "--learning-rate", "0.01",
                 "--lr-scheduler", "constant", "--warmup-steps", "0", "--dtype", "float32", "--progress", "false",
                 "--general-eval", "none", "--eval-before", "false", "--eval-max-new-tokens", "4"])
    assert code == 0
    return json.loads((output / "summary.json").read_text())


@pytest.mark.slow  # two training runs: 8.8 s on a quiet moment, 41 s with ~9 agents on 2 cores (pytest --durations)
def test_colours_are_learned_from_the_pixels(vlm_dir, tmp_path):
    base = vlm_dir("qwen2_vl")
    seen = held_out_exact_match(base, tmp_path / "images", blank=False)
    blanked = held_out_exact_match(base, tmp_path / "blank", blank=True)
    chance = 1 / len(COLOURS)
    assert seen["exact_match_before"] <= chance
    assert seen["exact_match_after"] >= 0.9
    # One grey image for every record: one answer for all, right for a quarter of the balanced held-out set at most.
    assert blanked["exact_match_after"] <= chance
