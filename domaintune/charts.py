"""Small self-contained SVG charts for reports: the loss curve, the confusion matrix, counts.

Plain SVG text (no plotting library); :func:`data_uri` embeds one in markdown, which the
Prefect UI renders in a markdown artifact.
"""

from __future__ import annotations

import base64
import math
from html import escape
from typing import Any


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / (n - 1)
    return [lo + i * step for i in range(n)]


def loss_curve_svg(log_history: list[dict[str, Any]], width: int = 640, height: int = 300) -> str:
    """Training loss and validation loss against the optimizer step."""
    series = {
        "training loss": [
            (h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h
        ],
        "validation loss": [
            (h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h
        ],
    }
    points = [p for s in series.values() for p in s if math.isfinite(p[1])]
    left, right, top, bottom = 56, 16, 28, 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="16" font-size="13">Loss by optimizer step</text>',
    ]
    if not points:
        parts.append(f'<text x="{left}" y="{height // 2}">no losses were logged</text></svg>')
        return "".join(parts)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1e-6
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts.append(
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#444"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#444"/>'
    )
    for y in _ticks(y0, y1):
        parts.append(
            f'<line x1="{left}" y1="{sy(y):.1f}" x2="{left + pw}" y2="{sy(y):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>'
        )
    for x in _ticks(x0, x1):
        parts.append(
            f'<text x="{sx(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{x:.0f}</text>'
        )
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle">step</text>')
    colours = {"training loss": "#1f77b4", "validation loss": "#d62728"}
    for i, (name, pts) in enumerate(series.items()):
        pts = [p for p in pts if math.isfinite(p[1])]
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{colours[name]}" stroke-width="2"/>'
        )
        for x, y in pts if len(pts) < 40 else []:
            parts.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colours[name]}"/>'
            )
        lx = left + pw - 150
        ly = top + 14 + 16 * i
        parts.append(
            f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 20}" y2="{ly - 4}" stroke="{colours[name]}" '
            f'stroke-width="2"/><text x="{lx + 26}" y="{ly}">{name}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def confusion_matrix_svg(labels: list[str], matrix: list[list[int]], cell: int = 0) -> str:
    """Counts, rows = true label, columns = predicted; shaded by the row's share."""
    n = len(labels)
    cell = cell or max(18, min(48, 480 // max(n, 1)))
    label_w = 8 + 7 * max((len(str(x)) for x in labels), default=4)
    top = label_w + 24
    width, height = label_w + n * cell + 20, top + n * cell + 12
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="{10 if n > 12 else 11}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        '<text x="4" y="14" font-size="12">rows: true label, columns: predicted</text>',
    ]
    for j, lab in enumerate(labels):
        x = label_w + j * cell + cell / 2
        parts.append(
            f'<text transform="translate({x:.1f},{top - 4}) rotate(-60)">{escape(str(lab))}</text>'
        )
    for i, (lab, row) in enumerate(zip(labels, matrix, strict=True)):
        total = sum(row) or 1
        y = top + i * cell
        parts.append(
            f'<text x="{label_w - 4}" y="{y + cell / 2 + 4:.1f}" text-anchor="end">'
            f"{escape(str(lab))}</text>"
        )
        for j, count in enumerate(row):
            share = count / total
            shade = int(255 - 200 * share)
            fill = f"rgb({shade},{shade},255)" if i != j else f"rgb({shade},255,{shade})"
            x = label_w + j * cell
            colour = "white" if share > 0.6 else "black"
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" '
                f'stroke="#ccc"/><text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                f'text-anchor="middle" fill="{colour}">{count}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart_svg(counts: dict[str, int], title: str = "", bar: int = 18) -> str:
    """Horizontal bars, one per key, longest first, each with its count."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    label_w = 8 + 7 * max((len(str(k)) for k, _ in items), default=4)
    plot_w, top = 360, 24 if title else 8
    width, height = label_w + plot_w + 60, top + len(items) * (bar + 6) + 8
    most = max((v for _, v in items), default=0) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        parts.append(f'<text x="4" y="15" font-size="12">{escape(title)}</text>')
    for i, (key, value) in enumerate(items):
        y = top + i * (bar + 6)
        w = plot_w * value / most
        parts.append(
            f'<text x="{label_w - 4}" y="{y + bar / 2 + 4:.1f}" text-anchor="end">'
            f"{escape(str(key))}</text>"
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar}" fill="#4c78a8"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + bar / 2 + 4:.1f}">{value}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
