"""compare.png: gain against cost and forgetting with 95% intervals as error bars, the Pareto front, one legend,
and no text drawn over other text (the peak-memory labels used to collide)."""

from __future__ import annotations

from tuneforge.choose.chart import draw_chart
from tuneforge.choose.summary import summarize


def rows():
    """LoRA and DoRA cost about the same memory for about the same gain: where names beside points overlapped."""
    out = []
    for seed in range(3):
        out += [{"method": "lora", "seed": seed, "peak_memory_mb": 2030.0 + seed, "wall_s": 30.0 + seed,
                 "gain": 0.401 + 0.001 * seed, "forgetting": 0.010},
                {"method": "dora", "seed": seed, "peak_memory_mb": 2034.0 + seed, "wall_s": 33.0 + seed,
                 "gain": 0.402 + 0.001 * seed, "forgetting": 0.012},
                {"method": "prompt_tuning", "seed": seed, "peak_memory_mb": 1733.0, "wall_s": 25.0 + seed,
                 "gain": 0.1 + 0.01 * seed, "forgetting": 0.0},
                {"method": "full", "seed": seed, "error": "out of memory"}]  # no gain: not drawn
    return out


def test_one_legend_error_bars_a_pareto_front_and_no_overlapping_text():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = draw_chart(summarize(rows(), seed=0))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for legend in fig.legends for t in legend.get_texts()]
    for ax in fig.axes:  # the tick labels drawn: a tick outside the axis's range has a label that is not
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        texts += [*ax.texts, *(t for t in ax.xaxis.get_ticklabels() if x0 <= t.get_position()[0] <= x1),
                  *(t for t in ax.yaxis.get_ticklabels() if y0 <= t.get_position()[1] <= y1)]
    texts = [t for t in texts if t.get_visible() and t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lora", "dora", "prompt_tuning", "Pareto front"]
    memory = fig.axes[1]
    assert "process max RSS" in memory.get_xlabel() and memory.get_xlim()[0] == 0  # equal memory looks equal
    # Each method keeps its colour in every panel; its error bars span its interval.
    for ax in fig.axes:
        assert {c.get_label() for c in ax.containers} == {"lora", "dora", "prompt_tuning"}
    # Pareto front on wall time: prompt_tuning (cheapest) then dora (higher gain at a higher cost) — lora is
    # beaten by neither on both axes, so it is on the front too.
    wall = fig.axes[0]
    front = [line for line in wall.get_lines() if line.get_linestyle() == "--"]
    assert len(front) == 1 and list(front[0].get_xdata()) == [26.0, 31.0, 34.0]
    assert draw_chart(summarize([{"method": "full", "error": "failed"}], seed=0)) is None
