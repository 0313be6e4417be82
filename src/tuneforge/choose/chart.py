"""``compare.png``: each method's mean gain against what it cost and what it forgot, with the 95% intervals of both
as error bars and the Pareto front drawn through the methods nothing beats on both axes.

One colour and marker per method in every panel, named once in a legend below (names written beside the points
collided where methods cost about the same). Cost axes start at zero, so methods of nearly equal memory look nearly
equal instead of a zoomed-in spread of a few MB, and carry at most five ticks, so their labels never touch.
"""

from __future__ import annotations

from typing import Any

from .stats import Interval, pareto_front
from .summary import MethodSummary

# (x quantity, axis label, lower is better: a cost) per panel; gain is always the y axis.
PANELS = [("wall_s", "cost: wall time (s)"),
          ("peak_memory_mb", "cost: peak memory, MB (GPU: CUDA max allocated; CPU: process max RSS)"),
          ("forgetting", "forgetting: general-text loss rise (lower is better)")]
MARKERS = "osD^v<>ph*"  # with ten colours: a hundred methods told apart
FROM_ZERO = {"wall_s", "peak_memory_mb"}


def draw_chart(summaries: list[MethodSummary]):
    """The figure, or None when no method has a gain."""
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend
    from matplotlib.lines import Line2D

    done = [s for s in summaries if "gain" in s.intervals]
    if not done:
        return None
    styles: dict[str, dict[str, Any]] = {s.method: dict(color=f"C{i % 10}", marker=MARKERS[i // 10 % len(MARKERS)])
                                         for i, s in enumerate(done)}
    panels = [(key, label) for key, label in PANELS if any(key in s.intervals for s in done)]
    fig = Figure(figsize=(5 * max(1, len(panels)), 4.8), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        _panel(ax, [s for s in done if key in s.intervals], key, label, styles)
    handles = [Line2D([], [], linestyle="none", markersize=7, label=name, **style) for name, style in styles.items()]
    handles.append(Line2D([], [], color="0.4", linestyle="--", label="Pareto front"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), frameon=False)
    seeds = max(s.intervals["gain"].n for s in done)
    fig.suptitle("gain vs cost and forgetting per method (up and to the left is better)"
                 + (f"; bars: 95% intervals over {seeds} seeds" if seeds > 1 else ""))
    return fig


def _panel(ax, summaries: list[MethodSummary], key: str, label: str, styles: dict[str, dict]) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    for s in summaries:
        x, y = s.intervals[key], s.intervals["gain"]
        ax.errorbar([x.mean], [y.mean], xerr=_error(x), yerr=_error(y), linestyle="none", markersize=7, capsize=3,
                    alpha=0.85, label=s.method, **styles[s.method])
    front = pareto_front({s.method: (s.intervals[key].mean, s.intervals["gain"].mean) for s in summaries})
    if len(front) > 1:
        points = [(s.intervals[key].mean, s.intervals["gain"].mean) for name in front for s in summaries
                  if s.method == name]
        ax.plot(*zip(*points), color="0.4", linestyle="--", linewidth=1, zorder=0)
    highest = max(s.intervals[key].high for s in summaries)
    if key in FROM_ZERO and highest > 0:
        ax.set_xlim(0, highest * 1.15)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.xaxis.set_major_formatter(FuncFormatter(_short))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.set_xlabel(label, fontsize=9)
    ax.set_ylabel("gain: held-out loss drop")
    ax.grid(True, alpha=0.3)


def _error(interval: Interval) -> list[list[float]]:
    return [[interval.mean - interval.low], [interval.high - interval.mean]]


def _short(value: float, _position: Any = None) -> str:
    """2500 -> "2.5k", 0.0125 -> "0.0125": tick labels that stay short."""
    if abs(value) >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:.4g}"


def chart(summaries: list[MethodSummary], path) -> Any:
    """``draw_chart`` as a PNG at ``path``; None when there is nothing to draw."""
    fig = draw_chart(summaries)
    if fig is None:
        return None
    fig.savefig(path, dpi=100, format="png")
    return path
