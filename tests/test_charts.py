"""Report charts (matplotlib SVG) are well-formed, deterministic and show what they claim."""

from __future__ import annotations

import base64
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

from domaintune.reporting.charts import (
    bar_chart_svg,
    confusion_matrix_svg,
    data_uri,
    training_curves_svg,
)

#: A Trainer log_history: a training entry per step, an evaluation every 10 steps, the summary.
HISTORY = (
    [
        {"loss": 2.0 / s, "grad_norm": 1.5, "learning_rate": 5e-5 * (1 - s / 30), "step": s}
        for s in range(1, 30)
    ]
    + [
        {"eval_loss": 1.5 / s, "eval_accuracy": 0.5 + s / 100, "eval_runtime": 0.31, "step": s}
        for s in (10, 20, 29)
    ]
    + [{"train_loss": 0.4, "train_runtime": 3.2, "step": 29}]
)


def _texts(svg: str) -> list[str]:
    """Every text shown, in document order (the SVG keeps text as ``<text>``)."""
    root = ET.fromstring(svg)
    return ["".join(e.itertext()) for e in root.iter() if e.tag.endswith("}text")]


def _tick_labels(svg: str, axis: str = "xy") -> list[str]:
    root = ET.fromstring(svg)
    return [
        "".join(t.itertext())
        for g in root.iter()
        if g.tag.endswith("}g") and re.fullmatch(rf"[{axis}]tick_\d+", g.get("id", ""))
        for t in g.iter()
        if t.tag.endswith("}text")
    ]


def _significant_digits(label: str) -> int:
    return len(re.sub(r"^0+", "", re.sub(r"[^0-9]", "", label)).rstrip("0") or "0")


def _is_round_scale(labels: list[str]) -> bool:
    """Evenly spaced by 1, 2, 2.5 or 5 times a power of ten (0.5, 1.0, 1.5; 0, 5, 10)."""
    values = [float(t.replace("\u2212", "-")) for t in labels]
    gaps = {round(b - a, 12) for a, b in zip(values, values[1:], strict=False)}
    if len(gaps) != 1:
        return False
    gap = gaps.pop()
    return round(gap / 10 ** math.floor(math.log10(gap)), 9) in (1, 2, 2.5, 5)


def test_training_curves_show_loss_metric_and_learning_rate_with_round_ticks():
    svg = training_curves_svg(HISTORY, metric="accuracy")
    texts = _texts(svg)
    for name in ("training loss", "validation loss", "validation accuracy", "learning rate"):
        assert name in texts, name
    assert "optimizer step" in texts and any(t.startswith("Training curves") for t in texts)
    # round ticks (not 0.0697, 0.454, 0.838; steps 10, 58, 105, 152), on every panel's axes
    root = ET.fromstring(svg)
    panels = [g for g in root.iter() if re.fullmatch(r"axes_\d+", g.get("id", ""))]
    assert len(panels) == 3
    for panel in panels:
        for axis in "xy":
            ticks = _tick_labels(ET.tostring(panel, encoding="unicode"), axis)
            if axis == "y" or panel is panels[-1]:  # the panels share the bottom one's steps
                assert len(ticks) >= 3 and _is_round_scale(ticks), ticks
            assert all(_significant_digits(t) <= 3 for t in ticks), ticks
    assert all(float(t).is_integer() for t in _tick_labels(svg, "x")), "whole steps"
    # no dates or random ids: the same history draws the same bytes, from any thread
    assert "<dc:date>" not in svg and svg == training_curves_svg(HISTORY, metric="accuracy")
    with ThreadPoolExecutor(3) as pool:
        drawn = list(pool.map(lambda m: training_curves_svg(HISTORY, metric=m), ["accuracy"] * 3))
    assert drawn == [svg] * 3


def test_a_panel_without_data_is_left_out():
    losses_only = [{k: v for k, v in h.items() if k != "learning_rate"} for h in HISTORY]
    texts = _texts(training_curves_svg(losses_only, metric="accuracy"))
    assert "validation accuracy" in texts and "learning rate" not in texts
    texts = _texts(training_curves_svg(HISTORY))  # no metric asked for
    assert "learning rate" in texts and not any("accuracy" in t for t in texts)
    texts = _texts(training_curves_svg(HISTORY, metric="macro_f1"))  # never evaluated
    assert "training loss" in texts and not any("macro_f1" in t for t in texts)
    only_lr = [{"learning_rate": 1e-4, "step": 1}, {"learning_rate": 5e-5, "step": 2}]
    texts = _texts(training_curves_svg(only_lr))
    assert "learning rate" in texts and "training loss" not in texts
    empty = training_curves_svg([{"train_runtime": 1.0, "step": 0}])
    assert any(t.startswith("no losses") for t in _texts(empty)) and len(empty) < 4000


def _cell_colours(svg: str) -> dict[str, str]:
    """Each count's text colour (the fill in its style), by the count."""
    root = ET.fromstring(svg)
    colours = {}
    for e in root.iter():
        if e.tag.endswith("}text") and (e.text or "").isdigit():
            match = re.search(r"fill: (#[0-9a-f]{6})", e.get("style", ""))
            colours[e.text] = match.group(1) if match else "#000000"
    return colours


def test_confusion_matrix_shows_every_count_and_label_readably():
    labels = ["negative", "pos & <more>", "$5 off"]
    svg = confusion_matrix_svg(labels, [[50, 1, 3], [0, 7, 2], [4, 4, 31]])
    texts = _texts(svg)
    assert {"50", "1", "3", "0", "7", "2", "4", "31"} <= set(texts)
    for label in labels:  # escaped in the XML, shown as written, on both axes
        assert texts.count(label) == 2, label
    assert "predicted label" in texts and "true label" in texts
    colours = _cell_colours(svg)
    assert colours["50"] != colours["0"], "the darkest and the lightest cell's text differ"
    assert svg == confusion_matrix_svg(labels, [[50, 1, 3], [0, 7, 2], [4, 4, 31]])
    uri = data_uri(svg)
    assert base64.b64decode(uri.split(",", 1)[1]).decode() == svg


def test_bar_chart_writes_each_value_at_its_bar():
    svg = bar_chart_svg({"neutral": 7, "positive": 12345, "negative": 300}, "per predicted class")
    texts = _texts(svg)
    assert {"per predicted class", "12,345", "300", "7"} <= set(texts)
    keys = [t for t in texts if t in ("positive", "negative", "neutral")]
    assert keys == ["positive", "negative", "neutral"], "largest first"
    texts = _texts(bar_chart_svg({"learning_rate": 0.712, "weight_decay": 0.2}, "importance"))
    assert {"0.712", "0.2", "learning_rate", "weight_decay"} <= set(texts)


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, domaintune.reporting.charts; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
