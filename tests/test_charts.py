"""SVG charts for reports are well-formed and show what they claim."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

from domaintune.charts import confusion_matrix_svg, data_uri, loss_curve_svg


def test_loss_curve_has_both_series_and_parses():
    history = [{"step": s, "loss": 2.0 / s} for s in range(1, 30)] + [
        {"step": s, "eval_loss": 1.5 / s} for s in (10, 20, 29)
    ]
    svg = loss_curve_svg(history)
    root = ET.fromstring(svg)
    lines = [e for e in root.iter() if e.tag.endswith("polyline")]
    assert len(lines) == 2 and "training loss" in svg and "validation loss" in svg
    assert "no losses" in loss_curve_svg([])


def test_confusion_matrix_shows_every_count_and_label():
    svg = confusion_matrix_svg(["neg", "pos & more"], [[5, 1], [0, 7]])
    root = ET.fromstring(svg)
    texts = [e.text for e in root.iter() if e.tag.endswith("text")]
    assert {"5", "1", "0", "7", "neg", "pos & more"} <= set(texts)
    uri = data_uri(svg)
    assert base64.b64decode(uri.split(",", 1)[1]).decode() == svg
