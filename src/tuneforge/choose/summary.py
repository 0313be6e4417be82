"""What a compare's seeds say: per method, the mean and bootstrap 95% interval of each measured quantity, and a
verdict in words that names the methods the intervals cannot tell apart and how much worse the others are.

Gain (the held-out loss the run removed) decides the verdict; forgetting and cost (wall time, peak memory) are
reported the same way and break ties among the methods the gain cannot separate. Two methods are called
indistinguishable when their gain intervals overlap: with three seeds an overlap is weak evidence of a tie, but
non-overlapping intervals are a difference the seeds did not produce by chance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .stats import Interval, bootstrap_interval, difference_interval

# (row key, what it is in words, better when higher, format of a value); the quantities given an interval.
QUANTITIES = [("gain", "held-out loss drop", True, "{:+.4f}"),
              ("forgetting", "forgetting (general-text loss rise)", False, "{:+.4f}"),
              ("wall_s", "wall time, s", False, "{:,.1f}"),
              ("peak_memory_mb", "peak memory, MB", False, "{:,.0f}"),
              ("tokens_seen", "training tokens seen", True, "{:,.0f}")]
FORMATS = {key: fmt for key, _, _, fmt in QUANTITIES}


@dataclass
class MethodSummary:
    """One method over its seeds: the values each finished seed measured and their intervals."""

    method: str
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    intervals: dict[str, Interval] = field(default_factory=dict)
    learning_rate: float | None = None
    learning_rate_source: str | None = None
    trainable_params: int | None = None
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "seeds": self.seeds, "learning_rate": self.learning_rate,
                "learning_rate_source": self.learning_rate_source,
                "trainable_params": self.trainable_params, "values": self.values,
                "intervals": {k: v.as_dict() for k, v in self.intervals.items()}, "errors": self.errors}


def summarize(rows: list[dict[str, Any]], seed: int) -> list[MethodSummary]:
    """Per method (in the rows' order), the intervals of every quantity all its finished seeds measured.
    ``seed`` seeds the bootstrap: the same rows and seed give the same intervals."""
    summaries: dict[str, MethodSummary] = {}
    for row in rows:
        s = summaries.setdefault(row["method"], MethodSummary(row["method"]))
        if "error" in row:
            s.errors.append(f"seed {row.get('seed', '?')}: {row['error']}")
            continue
        s.seeds.append(row.get("seed", 0))
        s.learning_rate = row.get("learning_rate", s.learning_rate)
        s.learning_rate_source = row.get("learning_rate_source", s.learning_rate_source)
        s.trainable_params = row.get("trainable_params", s.trainable_params)
        for key, *_ in QUANTITIES:
            if isinstance(row.get(key), (int, float)):
                s.values.setdefault(key, []).append(float(row[key]))
    for s in summaries.values():
        s.values = {k: v for k, v in s.values.items() if len(v) == len(s.seeds)}  # measured by every seed
        s.intervals = {k: bootstrap_interval(v, seed) for k, v in s.values.items()}
    return list(summaries.values())


def cell(interval: Interval, fmt: str) -> str:
    """``0.4120 [0.4020, 0.4220]``; one value alone when there was one seed."""
    if interval.n == 1 or interval.low == interval.high:
        return fmt.format(interval.mean)
    return f"{fmt.format(interval.mean)} [{fmt.format(interval.low)}, {fmt.format(interval.high)}]"


def plus_minus(interval: Interval, fmt: str) -> str:
    return f"{fmt.format(interval.mean).lstrip('+')} ± {fmt.format(interval.half_width).lstrip('+')}"


def verdict(summaries: list[MethodSummary], seed: int) -> str:
    """The plain-words reading of the table: which methods the gain cannot tell apart, how much worse the others
    are (the gap and its bootstrap interval), and, among the tied, which costs and forgets least."""
    failed = [s for s in summaries if not s.seeds]
    scored = [s for s in summaries if "gain" in s.intervals]
    lines = [f"{s.method} failed ({s.errors[0]})" for s in failed]
    if len(scored) < 2:
        lines.insert(0, "nothing to compare: " + (f"only {scored[0].method} has a held-out gain" if scored else
                                                  "no method has a held-out gain (give --eval-data or --eval-split)"))
        return "; ".join(lines) + "."
    if min(s.intervals["gain"].n for s in scored) < 2:
        lines.insert(0, "one seed per method: a difference cannot be told from seed noise; run --seeds 3 or more "
                        "for intervals and a verdict")
        return "; ".join(lines) + "."
    best = max(scored, key=lambda s: s.intervals["gain"].mean)
    tied = [s for s in scored if s.intervals["gain"].overlaps(best.intervals["gain"])]
    worse = sorted((s for s in scored if s not in tied), key=lambda s: -s.intervals["gain"].mean)
    lines.insert(0, _lead(tied, best))
    for s in worse:
        gap = difference_interval(best.values["gain"], s.values["gain"], seed)
        lines.append(f"{s.method} is worse by {plus_minus(gap, '{:.4f}')} in held-out loss drop "
                     f"(95% interval of the gap {gap.low:.4f} to {gap.high:.4f})")
    lines += _tie_breaks(tied)
    return "; ".join(lines) + "."


def _lead(tied: list[MethodSummary], best: MethodSummary) -> str:
    gains = ", ".join(f"{s.method} {plus_minus(s.intervals['gain'], '{:+.4f}')}" for s in tied)
    if len(tied) == 1:
        return f"{best.method} gains most ({gains} held-out loss drop; no other method's interval reaches it)"
    names = ", ".join(s.method for s in tied[:-1]) + f" and {tied[-1].method}"
    return f"{names} are indistinguishable here (held-out loss drop {gains}: the 95% intervals overlap)"


def _tie_breaks(tied: list[MethodSummary]) -> list[str]:
    """Among methods the gain cannot separate: the one that costs least wall time, and the one that forgets least,
    said only where its interval is clear of another's."""
    if len(tied) < 2:
        return []
    out = []
    for key, words, verb in (("wall_s", "wall time", "costs least"), ("forgetting", "forgetting", "forgets least")):
        having = [s for s in tied if key in s.intervals]
        if len(having) < 2:
            continue
        low = min(having, key=lambda s: s.intervals[key].mean)
        clear = [s for s in having if s is not low and s.intervals[key].low > low.intervals[key].high]
        if clear:
            fmt = FORMATS[key]
            out.append(f"of those, {low.method} {verb} ({words} {plus_minus(low.intervals[key], fmt)} against "
                       + ", ".join(f"{s.method} {plus_minus(s.intervals[key], fmt)}" for s in clear) + ")")
    return out
