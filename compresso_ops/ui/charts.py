"""Small hand-written SVG charts for the report: no plotting dependency, and files that diff as text.

Three kinds cover a release review: training curves over steps (raw and smoothed, with the pruning
phases marked), per-layer kept structures (one thin bar per layer against the source, readable at 80
layers), and kept shares per structure (horizontal bars: heads, FFN channels, hidden dims).

Layout, top to bottom: the title, the legend on its own row(s), the plot, the x axis and its label, so
nothing overlaps whatever the names. Callers pass human labels; this module draws what it is given.
"""

from __future__ import annotations

import math
from html import escape

WIDTH = 640
LEFT, RIGHT, BOTTOM = 64, 20, 44
TITLE_Y, LEGEND_Y, LEGEND_ROW = 20, 38, 16
CHAR_W = 6.2  # width of an average character at font-size 11, for laying out the legend
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
SOURCE_FILL = "#e3e3e3"
MAX_X_LABELS = 16


def _svg(body: list[str], title: str, height: float) -> str:
    return "\n".join([
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}" '
         f'viewBox="0 0 {WIDTH} {height:.0f}" font-family="sans-serif" font-size="11">'),
        f"<title>{escape(title)}</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="{TITLE_Y}" text-anchor="middle" font-size="14">{escape(title)}</text>',
        *body,
        "</svg>",
    ]) + "\n"


def _legend(entries: list[tuple[str, str, str]]) -> tuple[list[str], float]:
    """Legend items (name, colour, 'line'|'dash'|'box') in rows under the title; returns the body and the y
    where the plot may start."""
    body, x, y = [], float(LEFT), float(LEGEND_Y)
    for name, color, kind in entries:
        width = 22 + CHAR_W * len(name)
        if x + width > WIDTH - RIGHT and x > LEFT:
            x, y = float(LEFT), y + LEGEND_ROW
        if kind == "box":
            body.append(f'<rect x="{x:.1f}" y="{y - 8:.1f}" width="12" height="9" fill="{color}"/>')
        else:
            dash = ' stroke-dasharray="4 3"' if kind == "dash" else ""
            body.append(f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 14:.1f}" y2="{y - 4:.1f}" stroke="{color}" '
                        f'stroke-width="2"{dash}/>')
        body.append(f'<text x="{x + 18:.1f}" y="{y:.1f}">{escape(name)}</text>')
        x += width + 12
    return body, (y + 14 if entries else LEGEND_Y - 6)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if hi - lo <= 1e-9 * max(1.0, abs(lo), abs(hi)):  # a flat series (up to rounding): give it a band
        lo, hi = lo - (abs(lo) * 0.05 or 0.5), hi + (abs(hi) * 0.05 or 0.5)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def _fmt(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


class _Plot:
    """A plot area below the legend with a y axis (grid, tick labels, label) and an x-axis label."""

    def __init__(self, top: float, height: float, ylo: float, yhi: float, ylabel: str, xlabel: str,
                 yfmt: str = "") -> None:
        self.top, self.bottom = top, top + height
        self.left, self.right = LEFT, WIDTH - RIGHT
        ticks = _nice_ticks(ylo, yhi)
        self.lo, self.hi = ticks[0], ticks[-1]
        self.body: list[str] = []
        for t in ticks:
            y = self.y(t)
            self.body.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.right}" y2="{y:.1f}" stroke="#e6e6e6"/>')
            label = f"{t:{yfmt}}" if yfmt else _fmt(t)
            self.body.append(f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        mid = (self.top + self.bottom) / 2
        self.body.append(f'<text x="14" y="{mid:.1f}" text-anchor="middle" '
                         f'transform="rotate(-90 14 {mid:.1f})">{escape(ylabel)}</text>')
        self.body.append(f'<text x="{(self.left + self.right) / 2:.1f}" y="{self.bottom + 34:.1f}" '
                         f'text-anchor="middle">{escape(xlabel)}</text>')
        self.body.append(f'<line x1="{self.left}" y1="{self.bottom:.1f}" x2="{self.right}" y2="{self.bottom:.1f}" '
                         'stroke="#333"/>')

    def y(self, v: float) -> float:
        return self.bottom - (self.bottom - self.top) * (v - self.lo) / (self.hi - self.lo)

    def x_label(self, x: float, text: str) -> None:
        self.body.append(f'<text x="{x:.1f}" y="{self.bottom + 14:.1f}" text-anchor="middle">{escape(text)}</text>')


def smooth(points: list[tuple[float, float]], span: int | None = None) -> list[tuple[float, float]]:
    """Exponential moving average (span `span`, default a twentieth of the points), bias-corrected so the
    first values are not pulled towards zero."""
    if not points:
        return []
    span = span or max(1, len(points) // 20)
    alpha = 2 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for x, y in points:
        avg = (1 - alpha) * avg + alpha * y
        weight = (1 - alpha) * weight + alpha
        out.append((x, avg / weight))
    return out


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], ylabel: str, xlabel: str, *,
               smoothed: bool = False, markers: dict[float, str] | None = None, dashed: tuple[str, ...] = (),
               height: int = 320) -> str:
    """Lines over a shared x axis (steps). `smoothed`: each series drawn faint as logged and bold as its moving
    average. `markers`: x -> label of vertical boundaries (pruning phases). `dashed`: series drawn dashed
    (references such as a target). Non-finite points and empty series are left out."""
    series = {k: pts for k, v in series.items()
              if (pts := [(float(x), float(y)) for x, y in v if math.isfinite(y)])}
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in series.values() for _, y in pts] or [0.0, 1.0]
    entries = [(name + (" (smoothed; faint: as logged)" if smoothed and name not in dashed else ""),
                COLORS[i % len(COLORS)], "dash" if name in dashed else "line") for i, name in enumerate(series)]
    body, top = _legend(entries)
    markers = markers or {}
    plot = _Plot(top + (14 if markers else 0), height - top - BOTTOM - (14 if markers else 0), min(ys), max(ys),
                 ylabel, xlabel)
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(x: float) -> float:
        return plot.left + (plot.right - plot.left) * (x - xlo) / (xhi - xlo)

    for t in _nice_ticks(xlo, xhi):
        if xlo <= t <= xhi:
            plot.x_label(px(t), _fmt(t))
    for x, label in sorted(markers.items()):
        if xlo <= x <= xhi:
            plot.body.append(f'<line x1="{px(x):.1f}" y1="{plot.top - 12:.1f}" x2="{px(x):.1f}" y2="{plot.bottom:.1f}" '
                             'stroke="#888" stroke-dasharray="2 3"/>')
            plot.body.append(f'<text x="{px(x) + 3:.1f}" y="{plot.top - 3:.1f}" fill="#555">{escape(label)}</text>')

    def polyline(pts: list[tuple[float, float]], color: str, extra: str) -> str:
        coords = " ".join(f"{px(x):.1f},{plot.y(y):.1f}" for x, y in pts)
        return f'<polyline points="{coords}" fill="none" stroke="{color}" {extra}/>'

    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        if name in dashed:
            plot.body.append(polyline(pts, color, 'stroke-width="1.5" stroke-dasharray="5 3"'))
        elif smoothed:
            plot.body.append(polyline(pts, color, 'stroke-width="1" stroke-opacity="0.25"'))
            plot.body.append(polyline(smooth(pts), color, 'stroke-width="2"'))
        else:
            plot.body.append(polyline(pts, color, 'stroke-width="1.5"'))
    return _svg(body + plot.body, title, height)


def layer_chart(title: str, kept: list[float], full: float | None, ylabel: str, *, height: int = 260) -> str:
    """One thin bar per layer (kept count) over a light bar for the source's count; x labels every few layers so
    80 layers stay readable. Hovering a bar shows its numbers."""
    n = max(1, len(kept))
    entries = ([("source", SOURCE_FILL, "box")] if full else []) + [("kept", COLORS[0], "box")]
    body, top = _legend(entries)
    plot = _Plot(top, height - top - BOTTOM, 0.0, max([*kept, full or 0.0, 1.0]), ylabel, "layer")
    slot = (plot.right - plot.left) / n
    bar = max(1.0, slot * 0.8)
    every = next(k for k in (1, 2, 5, 10, 20, 50, 100, 10**9) if n / k <= MAX_X_LABELS)
    for i, v in enumerate(kept):
        x = plot.left + i * slot + (slot - bar) / 2
        share = f" of {full:g} ({v / full:.0%})" if full else ""
        if full:
            plot.body.append(f'<rect x="{x:.1f}" y="{plot.y(full):.1f}" width="{bar:.1f}" '
                             f'height="{plot.bottom - plot.y(full):.1f}" fill="{SOURCE_FILL}"/>')
        plot.body.append(f'<rect x="{x:.1f}" y="{plot.y(v):.1f}" width="{bar:.1f}" height="{plot.bottom - plot.y(v):.1f}" '
                         f'fill="{COLORS[0]}"><title>layer {i}: {v:g}{share}</title></rect>')
        if i % every == 0:
            plot.x_label(x + bar / 2, str(i))
    return _svg(body + plot.body, title, height)


def share_chart(title: str, rows: list[tuple[str, float, float]], *, height: int | None = None) -> str:
    """Horizontal bars of kept / source per structure (e.g. query heads, FFN channels, hidden dims), each
    labelled with its counts: what the pruning took from each kind of structure."""
    row_h, label_w = 30, 150
    height = height or int(TITLE_Y + 24 + row_h * len(rows) + 30)
    body = []
    span = WIDTH - RIGHT - label_w - 120
    for i, (name, kept, full) in enumerate(rows):
        y = TITLE_Y + 24 + i * row_h
        share = kept / full if full else 0.0
        body.append(f'<text x="{label_w - 8}" y="{y + 14}" text-anchor="end">{escape(name)}</text>')
        body.append(f'<rect x="{label_w}" y="{y + 3}" width="{span}" height="16" fill="{SOURCE_FILL}"/>')
        body.append(f'<rect x="{label_w}" y="{y + 3}" width="{span * share:.1f}" height="16" fill="{COLORS[0]}"/>')
        body.append(f'<text x="{label_w + span + 8}" y="{y + 15}">{kept:,.0f} of {full:,.0f} ({share:.0%})</text>')
    y = TITLE_Y + 24 + len(rows) * row_h + 12
    body.append(f'<rect x="{label_w}" y="{y - 9}" width="12" height="9" fill="{COLORS[0]}"/>'
                f'<text x="{label_w + 16}" y="{y}">kept</text>'
                f'<rect x="{label_w + 60}" y="{y - 9}" width="12" height="9" fill="{SOURCE_FILL}"/>'
                f'<text x="{label_w + 76}" y="{y}">removed (source total = full bar)</text>')
    return _svg(body, title, height)
