"""Small hand-written SVG charts for the report: no plotting dependency, and files that diff as text.

Two kinds are enough for a release review: grouped bars (kept vs. source structures per layer) and line
series (training loss, expected vs. target sparsity over steps).
"""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 36, 44
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _svg(body: list[str], title: str) -> str:
    return "\n".join([
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">'),
        f"<title>{escape(title)}</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
        *body,
        "</svg>",
    ]) + "\n"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if hi <= lo:
        hi = lo + 1.0
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
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.2e}"


def _axes(ylo: float, yhi: float, ylabel: str, xlabel: str) -> tuple[list[str], float, float]:
    """Y grid and labels; returns the body and the y range the ticks cover."""
    ticks = _nice_ticks(ylo, yhi)
    lo, hi = ticks[0], ticks[-1]
    plot_h = HEIGHT - TOP - BOTTOM
    body = []
    for t in ticks:
        y = TOP + plot_h * (1 - (t - lo) / (hi - lo))
        body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        body.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    body.append(f'<text x="14" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" '
                f'transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">{escape(ylabel)}</text>')
    body.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.1f}" y="{HEIGHT - 6}" '
                f'text-anchor="middle">{escape(xlabel)}</text>')
    body.append(f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" '
                'stroke="#333"/>')
    return body, lo, hi


def _legend(names: list[str]) -> list[str]:
    body, x = [], LEFT
    for i, name in enumerate(names):
        body.append(f'<rect x="{x}" y="26" width="10" height="4" fill="{COLORS[i % len(COLORS)]}"/>')
        body.append(f'<text x="{x + 14}" y="31">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return body


def bar_chart(title: str, categories: list[str], series: dict[str, list[float]], ylabel: str, xlabel: str) -> str:
    """Grouped vertical bars: one group per category, one bar per series."""
    values = [v for vs in series.values() for v in vs]
    body, lo, hi = _axes(min(0.0, *values) if values else 0.0, max(values, default=1.0), ylabel, xlabel)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    group_w = plot_w / max(1, len(categories))
    bar_w = group_w * 0.8 / max(1, len(series))
    for c, cat in enumerate(categories):
        x0 = LEFT + c * group_w + group_w * 0.1
        for s, (name, vs) in enumerate(series.items()):
            v = vs[c]
            h = plot_h * (v - lo) / (hi - lo)
            body.append(f'<rect x="{x0 + s * bar_w:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar_w:.1f}" '
                        f'height="{h:.1f}" fill="{COLORS[s % len(COLORS)]}"><title>{escape(name)} {escape(cat)}: '
                        f'{_fmt(v)}</title></rect>')
        body.append(f'<text x="{LEFT + (c + 0.5) * group_w:.1f}" y="{HEIGHT - BOTTOM + 14}" '
                    f'text-anchor="middle">{escape(cat)}</text>')
    return _svg(body + _legend(list(series)), title)


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], ylabel: str, xlabel: str) -> str:
    """Polylines over a shared x axis (steps); non-finite points and empty series are left out."""
    series = {k: pts for k, v in series.items() if (pts := [(x, y) for x, y in v if math.isfinite(y)])}
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in series.values() for _, y in pts] or [0.0, 1.0]
    body, lo, hi = _axes(min(ys), max(ys), ylabel, xlabel)
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    for t in _nice_ticks(xlo, xhi):
        if xlo <= t <= xhi:
            x = LEFT + plot_w * (t - xlo) / (xhi - xlo)
            body.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        coords = " ".join(f"{LEFT + plot_w * (x - xlo) / (xhi - xlo):.1f},"
                          f"{TOP + plot_h * (1 - (y - lo) / (hi - lo)):.1f}" for x, y in pts)
        body.append(f'<polyline points="{coords}" fill="none" stroke="{COLORS[i % len(COLORS)]}" '
                    f'stroke-width="1.5"><title>{escape(name)}</title></polyline>')
    return _svg(body + _legend(list(series)), title)
