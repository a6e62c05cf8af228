"""The report's SVG charts: title, legend and plot never overlap, labels stay apart at 80 layers, and the
smoothing and phase marks a reviewer reads are drawn."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET

from compresso_ops.ui import charts

NS = "{http://www.w3.org/2000/svg}"


def _texts(svg: str) -> list[tuple[float, float, str]]:
    root = ET.fromstring(svg)
    return [(float(t.get("x", 0)), float(t.get("y", 0)), t.text or "") for t in root.iter(f"{NS}text")
            if "rotate" not in (t.get("transform") or "")]


def _grid_top(svg: str) -> float:
    """The y of the highest horizontal grid line: the top of the plot area."""
    ys = [float(m.group(1)) for m in re.finditer(r'<line x1="[\d.]+" y1="([\d.]+)" x2="[\d.]+" y2="\1" stroke="#e6e6e6"',
                                                 svg)]
    return min(ys)


def test_legend_sits_between_the_title_and_the_plot_even_when_it_wraps():
    names = {f"a rather long series name number {i}": [(s, float(s * i)) for s in range(50)] for i in range(5)}
    svg = charts.line_chart("Title", names, "value", "step")
    texts = _texts(svg)
    title_y = next(y for _, y, t in texts if t == "Title")
    legend = [(x, y) for x, y, t in texts if t.startswith("a rather long")]
    assert len({y for _, y in legend}) > 1  # wrapped onto several rows
    assert all(title_y + 10 <= y < _grid_top(svg) - 4 for _, y in legend)
    assert all(x + charts.CHAR_W * 40 <= charts.WIDTH for x, _ in legend)  # no entry runs off the right edge


def test_eighty_layers_get_spaced_labels_and_a_bar_each():
    kept = [float(10 + i % 7) for i in range(80)]
    svg = charts.layer_chart("Query heads kept per layer", kept, 16.0, "query heads")
    root = ET.fromstring(svg)
    kept_bars = [r for r in root.iter(f"{NS}rect") if r.find(f"{NS}title") is not None]
    assert len(kept_bars) == 80
    labels = sorted(x for x, _, t in _texts(svg) if t.isdigit() and x > charts.LEFT)  # not the y-axis ticks
    assert len(labels) <= charts.MAX_X_LABELS
    assert min(b - a for a, b in itertools.pairwise(labels)) >= 25  # readable: labels do not touch


def test_smoothed_curves_keep_the_raw_line_and_mark_phases():
    points = [(s, 3.0 - s * 0.01 + (0.3 if s % 2 else -0.3)) for s in range(1, 101)]
    svg = charts.line_chart("Pruning: LM loss", {"LM loss": points}, "loss", "step", smoothed=True,
                            markers={11.0: "ramp starts", 71.0: "hold starts"})
    assert svg.count("<polyline") == 2 and 'stroke-opacity="0.25"' in svg
    assert "ramp starts" in svg and "hold starts" in svg
    smoothed = charts.smooth(points)
    wiggle = max(abs(b[1] - a[1]) for a, b in itertools.pairwise(smoothed[10:]))
    assert wiggle < 0.3  # the raw series jumps 0.6 every step
    assert abs(smoothed[0][1] - points[0][1]) < 1e-9  # no pull towards zero at the start


def test_a_flat_series_still_gets_an_axis():
    svg = charts.line_chart("flat", {"x": [(1, 0.1), (2, 0.1 + 1e-16)]}, "v", "step")
    ET.fromstring(svg)
