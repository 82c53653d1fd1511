"""Charts for reports, drawn with matplotlib as SVG: training curves, confusion matrix, bars.

:func:`data_uri` embeds one in markdown, which the Prefect UI renders in a markdown artifact.
The SVG is deterministic (fixed ids, no date), keeps text as text (small, searchable), and is
drawn with matplotlib's object API (``Figure`` + the SVG canvas), never pyplot's global figures.
matplotlib is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: rcParams for every chart: deterministic ids, text as ``<text>``, a plain readable style.
_STYLE = {
    "svg.hashsalt": "domaintune",
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    # DejaVu Sans ships with matplotlib (it lays the text out); the others: a viewer's fallbacks
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e6e6e6",
    "legend.frameon": False,
    "legend.fontsize": 8,
}
# rcParams are process-wide: one chart at a time sets (then restores) them
_LOCK = threading.Lock()


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


@contextmanager
def _figure(width: float, height: float) -> Iterator[Any]:
    """A figure (inches) in the chart style, without pyplot; the caller draws on it."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    with _LOCK, mpl.rc_context(_STYLE):
        yield Figure(figsize=(width, height), layout="constrained")


def _svg(fig: Any) -> str:
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    out = io.StringIO()
    FigureCanvasSVG(fig).print_svg(out, metadata={"Date": None})
    return out.getvalue()


def _plain(text: Any) -> str:
    """Text shown as written: a ``$`` would otherwise start matplotlib's math mode."""
    return str(text).replace("$", r"\$")


def _message(title: str, message: str) -> str:
    with _figure(4.5, 0.8) as fig:
        fig.suptitle(_plain(title), x=0.02, ha="left")
        fig.text(0.02, 0.3, _plain(message), color="#555555")
        return _svg(fig)


def _points(log_history: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """``(step, value)`` of every history entry with a finite number under ``key``."""
    return [
        (h["step"], float(h[key]))
        for h in log_history
        if "step" in h
        and isinstance(h.get(key), int | float)
        and not isinstance(h[key], bool)
        and math.isfinite(h[key])
    ]


def training_curves_svg(log_history: list[dict[str, Any]], metric: str | None = None) -> str:
    """The Trainer's ``log_history`` against the optimizer step, one panel per kind of value:
    training and validation loss, the validation ``metric`` per evaluation (its
    ``eval_<metric>`` entries) and the learning rate. A panel without data is left out."""
    from matplotlib.ticker import MaxNLocator

    panels = []  # (y label, [(series name, points, style)])
    losses = [
        ("training loss", _points(log_history, "loss"), {"color": "C0"}),
        ("validation loss", _points(log_history, "eval_loss"), {"color": "C3", "marker": "o"}),
    ]
    panels.append(("loss", [s for s in losses if s[1]]))
    if metric and metric != "loss":
        name = f"validation {metric}"
        style = {"color": "C2", "marker": "o"}
        panels.append((metric, [(name, _points(log_history, f"eval_{metric}"), style)]))
    panels.append(("learning rate", [("learning rate", _points(log_history, "learning_rate"), {})]))
    panels = [(label, series) for label, series in panels if any(s[1] for s in series)]
    title = "Training curves by optimizer step"
    if not panels:
        return _message(title, "no losses, metrics or learning rates were logged")

    with _figure(6.4, 0.6 + 1.9 * len(panels)) as fig:
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (label, series) in zip(axes, panels, strict=True):
            for name, points, style in series:
                steps, values = zip(*points, strict=True)
                kwargs = {"linewidth": 1.5, "markersize": 3.5, **style}
                if len(points) == 1:  # a line through one point is invisible
                    kwargs["marker"] = "o"
                elif len(points) > 40:  # markers would hide the line
                    kwargs.pop("marker", None)
                ax.plot(steps, values, label=_plain(name), **kwargs)
            ax.set_ylabel(_plain(label))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
            ax.legend(loc="best")
        axes[-1].xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10], integer=True))
        axes[-1].set_xlabel("optimizer step")
        fig.suptitle(title, x=0.02, ha="left")
        return _svg(fig)


def _text_colour(rgba: tuple[float, ...]) -> str:
    """Dark text on a light cell, white on a dark one (relative luminance of sRGB)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return "#1a1a1a" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.3 else "white"


def confusion_matrix_svg(labels: list[str], matrix: list[list[int]]) -> str:
    """A heat map of counts (rows: true label, columns: predicted), each cell's count on it."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    n = len(labels)
    if n == 0:
        return _message("Confusion matrix", "no labels")
    rows = [list(r) for r in matrix]
    if len(rows) != n or any(len(r) != n for r in rows):
        raise ValueError(f"confusion matrix: {n} labels need a {n} x {n} matrix of counts")
    longest = max(len(str(x)) for x in labels)
    cell = 0.42 if n <= 12 else max(0.18, 5.0 / n)
    font = 9 if n <= 12 else max(5, int(60 / n))
    margin = min(2.5, 0.3 + 0.065 * longest)  # room for the labels (rotated on the x axis)
    side = n * cell
    cmap = colormaps["Blues"]
    norm = Normalize(vmin=0, vmax=max(max(max(r) for r in rows), 1))

    with _figure(side + margin + 0.8, side + margin + 0.7) as fig:
        ax = fig.add_subplot()
        ax.pcolormesh(rows, cmap=cmap, norm=norm, edgecolors="white", linewidth=0.5)
        ax.set_aspect("equal")
        ax.invert_yaxis()  # row 0 at the top, as the matrix is written
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
        centred = {"ha": "center", "va": "center", "fontsize": font}
        for i, row in enumerate(rows):
            for j, count in enumerate(row):
                colour = _text_colour(cmap(norm(count)))
                ax.text(j + 0.5, i + 0.5, str(count), color=colour, **centred)
        ticks = [k + 0.5 for k in range(n)]
        names = [_plain(x) for x in labels]
        rotate = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"} if longest > 3 else {}
        ax.set_xticks(ticks, names, fontsize=font, **rotate)
        ax.set_yticks(ticks, names, fontsize=font)
        ax.tick_params(length=0)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        ax.set_title("Confusion matrix", loc="left")
        return _svg(fig)


def bar_chart_svg(counts: dict[str, int | float], title: str = "") -> str:
    """Horizontal bars, one per key, largest at the top, each with its value at its end."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    if not items:
        return _message(title, "nothing to show")
    longest = max(len(str(k)) for k, _ in items)

    def shown(v: float) -> str:
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"

    with _figure(min(9.0, 4.6 + 0.065 * longest), 0.7 + 0.26 * len(items)) as fig:
        ax = fig.add_subplot()
        keys = [_plain(k) for k, _ in items]
        bars = ax.barh(keys, [v for _, v in items], color="#4c78a8", height=0.7)
        ax.bar_label(bars, labels=[shown(v) for _, v in items], padding=3, fontsize=8)
        ax.invert_yaxis()  # the largest first
        ax.margins(x=0.15)
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0)
        if title:
            ax.set_title(_plain(title), loc="left")
        return _svg(fig)


def drift_svg(
    ref_labels: dict[str, float] | None,
    cur_labels: dict[str, float] | None,
    length_bins: list[float] | None = None,
    ref_length_counts: list[int] | None = None,
    cur_length_counts: list[int] | None = None,
) -> str:
    """Reference against current data, one panel each: label shares (grouped bars, the 30
    labels with the largest share on either side) and token lengths (histograms on the same
    ``length_bins`` edges, drawn as shares of rows so that samples of different sizes compare).
    A panel without data is left out; the counts are what :mod:`domaintune.drift` stores."""
    import numpy as np

    ref_colour, cur_colour = "#4c78a8", "#f58518"
    labels = None
    if ref_labels is not None and cur_labels is not None and (ref_labels or cur_labels):
        keys = sorted(
            set(ref_labels) | set(cur_labels),
            key=lambda k: (-max(ref_labels.get(k, 0.0), cur_labels.get(k, 0.0)), str(k)),
        )
        labels = (keys[:30], len(keys))
    lengths = None
    if length_bins is not None and ref_length_counts is not None and cur_length_counts is not None:
        edges = np.asarray(length_bins, dtype=float)
        ref_counts = np.asarray(ref_length_counts, dtype=float)
        cur_counts = np.asarray(cur_length_counts, dtype=float)
        if len(edges) >= 2 and len(ref_counts) == len(cur_counts) == len(edges) - 1:
            lengths = (edges, ref_counts, cur_counts)
        else:
            raise ValueError(
                f"drift chart: {len(edges)} bin edges need {max(len(edges) - 1, 0)} counts a "
                f"side, got {len(ref_counts)} and {len(cur_counts)}"
            )
    title = "Data drift: reference against current"
    if labels is None and lengths is None:
        return _message(title, "no labels or lengths to compare")

    panels = int(labels is not None) + int(lengths is not None)
    with _figure(6.4, 0.6 + 2.3 * panels) as fig:
        axes = list(fig.subplots(panels, 1, squeeze=False)[:, 0])
        if labels is not None:
            ax = axes.pop(0)
            keys, total = labels
            x = np.arange(len(keys))
            ref_y = [ref_labels.get(k, 0.0) for k in keys]
            cur_y = [cur_labels.get(k, 0.0) for k in keys]
            ax.bar(x - 0.2, ref_y, width=0.4, color=ref_colour, label="reference")
            ax.bar(x + 0.2, cur_y, width=0.4, color=cur_colour, label="current")
            longest = max(len(str(k)) for k in keys)
            rotate = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"}
            ax.set_xticks(x, [_plain(k) for k in keys], **(rotate if longest > 3 else {}))
            ax.tick_params(axis="x", length=0)
            ax.grid(axis="x", visible=False)
            ax.set_ylabel("share of rows")
            shown = f" ({len(keys)} of {total} labels)" if total > len(keys) else ""
            ax.set_title(_plain(f"Label shares{shown}"), loc="left")
            ax.legend(loc="best")
        if lengths is not None:
            ax = axes.pop(0)
            edges, ref_counts, cur_counts = lengths
            ref_share = ref_counts / max(ref_counts.sum(), 1.0)
            cur_share = cur_counts / max(cur_counts.sum(), 1.0)
            ax.stairs(ref_share, edges, fill=True, color=ref_colour, alpha=0.45, label="reference")
            ax.stairs(cur_share, edges, color=cur_colour, linewidth=1.8, label="current")
            ax.set_xlabel("length in tokens")
            ax.set_ylabel("share of rows")
            ax.set_title("Token lengths", loc="left")
            ax.legend(loc="best")
        fig.suptitle(title, x=0.02, ha="left")
        return _svg(fig)


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing, boolean or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def metric_history_svg(points: list[dict[str, Any]], metric: str = "metric") -> str:
    """A metric over time, one point per check in the given order (the champion's health
    history): the value with its interval bar (``low`` to ``high``), ``degraded`` points in
    red, and per version a dashed line at its ``registered`` figure (the test score it was
    registered with), spanning that version's consecutive points. Each point: ``when`` (ISO
    time), ``value``, ``low``, ``high``, ``label`` (the tick label, else ``when``), and
    optionally ``registered``, ``degraded`` and ``version`` (groups the registered lines; else
    consecutive points with one registered figure form a group)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    title = f"{metric} over time"
    if not points:
        return _message(title, "no checks yet")
    names = [str(p.get("label") or p.get("when") or i + 1) for i, p in enumerate(points)]
    longest = max(len(n) for n in names)
    healthy, degraded = "#4c78a8", "#d62728"

    with _figure(min(12.0, 3.2 + 0.45 * len(points)), 3.0 + min(2.0, 0.055 * longest)) as fig:
        ax = fig.add_subplot()
        for i, p in enumerate(points):
            value = _number(p.get("value"))
            if value is None:
                continue
            colour = degraded if p.get("degraded") else healthy
            low, high = _number(p.get("low")), _number(p.get("high"))
            if low is not None and high is not None:
                err = [[max(value - low, 0.0)], [max(high - value, 0.0)]]
                ax.errorbar([i], [value], yerr=err, color=colour, capsize=3, linewidth=1.2)
            ax.plot([i], [value], marker="o", markersize=5, color=colour, linestyle="none")
        # the registered figure: one dashed segment per run of points of one version
        groups: list[tuple[Any, float, int, int]] = []  # (key, registered, first, last)
        for i, p in enumerate(points):
            registered = _number(p.get("registered"))
            if registered is None:
                continue
            key = p.get("version", registered)
            if groups and groups[-1][0] == key and groups[-1][3] == i - 1:
                groups[-1] = (key, groups[-1][1], groups[-1][2], i)
            else:
                groups.append((key, registered, i, i))
        for _, registered, first, last in groups:
            ax.hlines(registered, first - 0.4, last + 0.4, colors="#555555", linestyles="dashed")
        handles = [Line2D([], [], color=healthy, marker="o", linestyle="none", label="healthy")]
        if any(p.get("degraded") for p in points):
            handles.append(
                Line2D([], [], color=degraded, marker="o", linestyle="none", label="degraded")
            )
        if groups:
            handles.append(
                Line2D([], [], color="#555555", linestyle="dashed", label="registered figure")
            )
        ax.legend(handles=handles, loc="best")
        rotate = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"}
        ax.set_xticks(range(len(points)), [_plain(n) for n in names], fontsize=8, **rotate)
        ax.set_xlim(-0.6, len(points) - 0.4)
        ax.grid(axis="x", visible=False)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        ax.set_ylabel(_plain(metric))
        ax.set_title(_plain(title), loc="left")
        return _svg(fig)
