"""Small inline SVG charts, so the report is one set of static files that opens offline."""

from __future__ import annotations

import math
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT, PAD = 460, 300, 50


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def line_chart(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, *,
               log_x: bool = False) -> str:
    """One polyline with markers per series; x optionally on a log10 axis."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return "<p>no data</p>"

    def fx(x: float) -> float:
        return math.log10(max(x, 1e-9)) if log_x else x

    xs, ys = [fx(p[0]) for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) + (1e-9 if max(xs) == min(xs) else 0)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 + (1e-9 if max(ys) <= 0 else 0)

    def sx(x: float) -> float:
        return PAD + (fx(x) - x0) / ((x1 - x0) or 1) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD - (y - y0) / ((y1 - y0) or 1) * (HEIGHT - 2 * PAD)

    parts = [f'<svg class="chart" width="{WIDTH}" height="{HEIGHT + 20 * len(series)}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT + 20 * len(series)}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#333"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#333"/>']
    for tick in _ticks(x0, x1):
        value = 10**tick if log_x else tick
        x = PAD + (tick - x0) / ((x1 - x0) or 1) * (WIDTH - 2 * PAD)
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - PAD + 16}" font-size="10" text-anchor="middle">{value:.3g}</text>')
    for tick in _ticks(y0, y1):
        parts.append(f'<text x="{PAD - 4}" y="{sy(tick) + 3:.1f}" font-size="10" text-anchor="end">{tick:.3g}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" font-size="12" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{HEIGHT / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {HEIGHT / 2})">{escape(y_label)}</text>')
    for index, (name, values) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        values = sorted(p for p in values if math.isfinite(p[1]))
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}">'
                     f'<title>{escape(name)}: L0 {x:.1f}, {y:.4g}</title></circle>' for x, y in values)
        y = HEIGHT + 14 * index + 6
        parts.append(f'<rect x="{PAD}" y="{y - 8}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{PAD + 16}" y="{y + 1}" font-size="11">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(counts: list[float], labels: list[str], x_label: str, *, width: int = 360, height: int = 140) -> str:
    """Vertical bars, one per count; the first, middle and last labels under the axis."""
    top = max(counts, default=0) or 1
    bar = (width - 2 * 10) / max(len(counts), 1)
    parts = [f'<svg class="chart" width="{width}" height="{height + 30}" viewBox="0 0 {width} {height + 30}" '
             'xmlns="http://www.w3.org/2000/svg">']
    for i, count in enumerate(counts):
        h = count / top * (height - 10)
        parts.append(f'<rect x="{10 + i * bar:.1f}" y="{height - h:.1f}" width="{max(bar - 1, 1):.1f}" '
                     f'height="{h:.1f}" fill="#1f77b4"><title>{escape(labels[i])}: {count:g}</title></rect>')
    for i in sorted({0, len(labels) // 2, len(labels) - 1}):
        if labels:
            parts.append(f'<text x="{10 + (i + 0.5) * bar:.1f}" y="{height + 12}" font-size="10" '
                         f'text-anchor="middle">{escape(labels[i])}</text>')
    parts.append(f'<text x="{width / 2}" y="{height + 26}" font-size="11" text-anchor="middle">'
                 f'{escape(x_label)}</text></svg>')
    return "".join(parts)
