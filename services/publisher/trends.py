"""Trend plots of the monitor page: turnaround and key QC values over the recent runs.

Small inline SVG charts (no image files, no plotting library in the
publisher), one per quantity, oldest run on the left. Every text in them is
escaped here; numbers are formatted, never taken as markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 360, 130, 48


def _chart(title: str, points: Sequence[tuple[str, float]]) -> Markup:
    values = [v for _, v in points]
    low, high = min(values), max(values)
    span = (high - low) or abs(high) or 1.0
    low, high = low - 0.1 * span, high + 0.1 * span
    n = len(points)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = PAD + (WIDTH - 2 * PAD) * (i / (n - 1) if n > 1 else 0.5)
        y = HEIGHT - PAD + (v - low) / (high - low) * (2 * PAD - HEIGHT)
        return round(x, 1), round(y, 1)

    coords = [xy(i, v) for i, (_, v) in enumerate(points)]
    parts = [
        (f'<svg class="trend" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{escape(title)}">'),
        f'<text x="{WIDTH / 2}" y="14" text-anchor="middle" font-size="12">{escape(title)}</text>',
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>',
        f'<text x="{PAD - 3}" y="{PAD + 4}" text-anchor="end" font-size="10">{high:.3g}</text>',
        f'<text x="{PAD - 3}" y="{HEIGHT - PAD}" text-anchor="end" font-size="10">{low:.3g}</text>',
        (f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle" font-size="10">'
        f"{n} run(s), oldest left</text>"),
    ]
    if n > 1:
        line = " ".join(f"{x},{y}" for x, y in coords)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#36c" stroke-width="1.5"/>')
    for (run_id, value), (x, y) in zip(points, coords):
        parts.append(f'<circle cx="{x}" cy="{y}" r="3" fill="#36c"><title>{escape(run_id)}: {value:.4g}'
                     "</title></circle>")
    parts.append("</svg>")
    return Markup("".join(parts))


def trend_charts(rows: Sequence[Any], labels: dict[str, str] | None = None) -> list[Markup]:
    """One chart for the turnaround of completed runs, one per key QC keyword any row has."""
    labels = labels or {}
    ordered = sorted(rows, key=lambda r: (r.delivered_at, r.run_id))
    charts = []
    turnaround = [(r.run_id, r.duration_s) for r in ordered if r.status != "failed" or r.duration_s]
    if turnaround:
        charts.append(_chart("turnaround (s)", turnaround))
    keywords = list(dict.fromkeys(k for r in ordered for k in r.key_qc))
    for keyword in keywords:
        points = [(r.run_id, r.key_qc[keyword]) for r in ordered if keyword in r.key_qc]
        charts.append(_chart(labels.get(keyword, keyword), points))
    return charts
