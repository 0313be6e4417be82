"""The statistics behind compare's intervals and verdict, on fixed numbers."""

from __future__ import annotations

import pytest

from tuneforge.choose.stats import Interval, bootstrap_interval, difference_interval, pareto_front
from tuneforge.choose.summary import summarize, verdict


def test_the_bootstrap_interval_of_three_values_by_hand():
    # Resampled means of [0, 0, 1] are 0 (p = 8/27 > 2.5%) ... 1 (p = 1/27 > 2.5%): the interval is [0, 1].
    assert bootstrap_interval([0.0, 0.0, 1.0], seed=0) == Interval(1 / 3, 0.0, 1.0, 3)
    # [0, 1, 2, ..., 9]: the mean's interval is about mean ± 1.96 * sd / sqrt(n) = 4.5 ± 1.78.
    wide = bootstrap_interval(list(range(10)), seed=0)
    assert wide.mean == 4.5 and wide.low == pytest.approx(4.5 - 1.78, abs=0.15)
    assert wide.high == pytest.approx(4.5 + 1.78, abs=0.15)
    assert bootstrap_interval([0.7], seed=0) == Interval(0.7, 0.7, 0.7, 1)  # one seed: no spread to resample


def test_the_same_seed_gives_the_same_interval():
    values = [0.41, 0.43, 0.40, 0.47]
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert difference_interval(values, [0.1, 0.2, 0.15], seed=3) == difference_interval(values, [0.1, 0.2, 0.15],
                                                                                         seed=3)


def test_the_gap_between_two_methods():
    gap = difference_interval([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], seed=0)
    assert gap == Interval(1.0, 1.0, 1.0, 3)
    gap = difference_interval([0.5, 0.6, 0.7], [0.1, 0.2, 0.3], seed=0)
    assert gap.mean == pytest.approx(0.4) and 0.2 < gap.low < 0.4 < gap.high < 0.6


def test_overlap_and_the_pareto_front():
    assert Interval(1, 0.9, 1.1, 3).overlaps(Interval(1.2, 1.1, 1.3, 3))  # touching counts as overlapping
    assert not Interval(1, 0.9, 1.0, 3).overlaps(Interval(1.2, 1.1, 1.3, 3))
    # (cost, gain): b costs more for more gain, c is beaten by a on both, d ties a's cost for less gain.
    assert pareto_front({"a": (1, 0.5), "b": (2, 0.9), "c": (3, 0.4), "d": (1, 0.3)}) == ["a", "b"]


def rows(gains: dict[str, list[float]], **extra: dict[str, list[float]]) -> list[dict]:
    return [{"method": m, "seed": i, "gain": g, **{k: v[m][i] for k, v in extra.items()}}
            for m, values in gains.items() for i, g in enumerate(values)]


def test_overlapping_intervals_are_called_indistinguishable_and_the_others_worse_with_the_gap():
    summaries = summarize(rows({"lora": [0.40, 0.42, 0.41], "dora": [0.41, 0.43, 0.39],
                                "prompt_tuning": [0.28, 0.30, 0.29]}), seed=0)
    text = verdict(summaries, seed=0)
    assert text.startswith("lora and dora are indistinguishable here")
    assert "prompt_tuning is worse by 0.1200 ± " in text
    gap = difference_interval([0.40, 0.42, 0.41], [0.28, 0.30, 0.29], seed=0)
    assert f"(95% interval of the gap {gap.low:.4f} to {gap.high:.4f})" in text


def test_a_clear_winner_and_the_tie_breaks_on_cost_and_forgetting():
    winner = verdict(summarize(rows({"lora": [0.5, 0.52, 0.51], "adapter": [0.3, 0.31, 0.32]}), seed=0), seed=0)
    assert winner.startswith("lora gains most") and "adapter is worse by 0.2000" in winner
    tied = rows({"lora": [0.40, 0.42, 0.41], "dora": [0.41, 0.43, 0.39]},
                wall_s={"lora": [30, 31, 32], "dora": [60, 62, 61]},
                forgetting={"lora": [0.01, 0.012, 0.011], "dora": [0.011, 0.01, 0.012]})
    text = verdict(summarize(tied, seed=0), seed=0)
    assert "of those, lora costs least (wall time 31.0 ± 1.0 against dora 61.0 ± 1.0)" in text
    assert "forgets least" not in text  # their forgetting intervals overlap: nothing to say


def test_one_seed_or_one_method_gives_no_verdict_and_failures_are_named():
    one_seed = verdict(summarize(rows({"lora": [0.4], "dora": [0.3]}), seed=0), seed=0)
    assert one_seed.startswith("one seed per method: a difference cannot be told from seed noise")
    failed = rows({"lora": [0.4, 0.41]}) + [{"method": "full", "seed": 0, "error": "CUDA out of memory"}]
    assert verdict(summarize(failed, seed=0), seed=0) == ("nothing to compare: only lora has a held-out gain; "
                                                          "full failed (seed 0: CUDA out of memory).")
