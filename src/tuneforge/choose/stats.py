"""Means with bootstrap 95% intervals over seeds, intervals of differences, and the Pareto front.

A compare trains every method with K seeds. A method's gain is then K numbers; its interval is the percentile
bootstrap of their mean (Efron & Tibshirani 1993, ch. 13): resample the K values with replacement many times, take the
mean of each resample, and keep the middle 95% of those means. With K = 3 the interval is rough (it can only be as wide
as the values themselves), which is why two methods are called different only when their intervals do not overlap.

Every resampling draws from ``numpy.random.default_rng(seed)``: the same values and seed give the same interval, so a
seeded rerun of a compare reproduces its table exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # numpy is imported by the functions: `tuneforge --help` builds compare's parser without it
    import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval over ``n`` values (``low == high == mean`` when n is 1)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width: the "± x" of "0.41 ± 0.02" (the interval need not be symmetric)."""
        return (self.high - self.low) / 2

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def _resampled_means(values: Sequence[float], rng: np.random.Generator, resamples: int) -> np.ndarray:
    import numpy as np

    data = np.asarray(values, dtype=float)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    return data[picks].mean(axis=1)


def _interval(mean: float, means: np.ndarray, n: int, level: float) -> Interval:
    import numpy as np

    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(mean), float(low), float(high), n)


def bootstrap_interval(values: Sequence[float], seed: int, resamples: int = RESAMPLES,
                       level: float = LEVEL) -> Interval:
    """The mean of ``values`` and the percentile-bootstrap ``level`` interval of that mean."""
    import numpy as np

    if not len(values):
        raise ValueError("bootstrap_interval: no values")
    rng = np.random.default_rng(seed)
    return _interval(float(np.mean(values)), _resampled_means(values, rng, resamples), len(values), level)


def difference_interval(a: Sequence[float], b: Sequence[float], seed: int, resamples: int = RESAMPLES,
                        level: float = LEVEL) -> Interval:
    """mean(a) - mean(b) and its bootstrap interval, each side resampled on its own (the seeds of two methods are
    separate runs, not pairs)."""
    import numpy as np

    if not len(a) or not len(b):
        raise ValueError("difference_interval: no values")
    rng = np.random.default_rng(seed)
    means = _resampled_means(a, rng, resamples) - _resampled_means(b, rng, resamples)
    return _interval(float(np.mean(a) - np.mean(b)), means, min(len(a), len(b)), level)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose point (cost, gain) no other point beats: none costs at most as much and gains at least as
    much, better in one of the two. Lower cost is better, higher gain is better; sorted by cost."""
    front = [name for name, (cost, gain) in points.items()
             if not any(c <= cost and g >= gain and (c < cost or g > gain) for c, g in points.values())]
    return sorted(front, key=lambda name: points[name][0])
