"""Data drift: each test fires on the shift it is for and stays quiet on unchanged data; the
report round-trips through JSON and renders; the charts draw; embeddings ignore padding."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from domaintune.drift import (
    MMD_MAX_ROWS,
    DriftReport,
    drift_report,
    embed,
    label_drift,
    length_drift,
    mmd_drift,
    population_stability_index,
    share_drift,
    token_statistics,
)
from domaintune.reporting.charts import drift_svg, metric_history_svg

UNK = 1
MAX_LENGTH = 64
LABELS = ["negative", "neutral", "positive"]


def _frame(
    seed: int,
    rows: int = 800,
    shares: tuple[float, ...] = (0.3, 0.4, 0.3),
    mean_length: float = 20.0,
    unknown_rate: float = 0.002,
) -> pd.DataFrame:
    """Tokenised rows: a label, token ids 5..49 with some unknown ids, Poisson lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.poisson(mean_length, rows) + 2, MAX_LENGTH)
    ids = []
    for n in lengths:
        seq = rng.integers(5, 50, n)
        seq[rng.random(n) < unknown_rate] = UNK
        ids.append([int(x) for x in seq])
    labels = rng.choice(LABELS, rows, p=list(shares))
    return pd.DataFrame({"input_ids": ids, "label": labels})


def _embeddings(seed: int, rows: int = 300, width: int = 16, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, width)) + shift


def _report(current: pd.DataFrame, **kwargs) -> DriftReport:
    return drift_report(
        _frame(1), current, label_column="label", unk_id=UNK, max_length=MAX_LENGTH, **kwargs
    )


def _drifted(report: DriftReport) -> set[str]:
    return {t.name for t in report.tests if t.drifted}


def test_the_same_distribution_shows_no_drift():
    report = _report(
        _frame(2), reference_emb=_embeddings(1), current_emb=_embeddings(2), permutations=200
    )
    names = [t.name for t in report.tests]
    assert names == ["labels", "length", "unknown_tokens", "truncation", "embeddings"]
    assert all(t.p_value is not None and t.p_value > 0.01 for t in report.tests), [
        t.describe() for t in report.tests
    ]
    assert not report.drifted
    assert report.describe() == "no drift (5 tests)"
    assert report.reference_rows == report.current_rows == 800


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (_frame(2, shares=(0.6, 0.3, 0.1)), "labels"),
        (_frame(2, mean_length=26.0), "length"),
        (_frame(2, unknown_rate=0.05), "unknown_tokens"),
    ],
    ids=["label mix", "longer texts", "unknown tokens"],
)
def test_a_shift_is_found_by_its_own_test(current, expected):
    report = _report(current)
    assert _drifted(report) == {expected}, [t.describe() for t in report.tests]
    assert report.test(expected).p_value < 1e-6
    assert report.drifted
    assert report.describe().startswith(f"drift in {expected} (")


def test_texts_cut_at_max_length_show_as_truncation_and_length_drift():
    report = _report(_frame(2, mean_length=70.0))
    truncation = report.test("truncation")
    assert truncation.drifted and truncation.p_value < 1e-6
    assert truncation.current["share"] > 0.5 > truncation.reference["share"]
    assert truncation.current["max_length"] == MAX_LENGTH
    assert report.test("length").drifted


def test_embeddings_shifted_by_a_constant_drift():
    test = mmd_drift(_embeddings(1), _embeddings(2, shift=0.5), permutations=200)
    assert test.drifted
    assert test.p_value == pytest.approx(1 / 201)  # no permutation reaches the observed MMD^2
    assert test.statistic > 0 and test.effect == test.statistic
    assert test.reference["bandwidth"] > 0
    assert (
        "embeddings (MMD^2"
        in DriftReport(reference_rows=300, current_rows=300, tests=[test]).describe()
    )


def test_psi_matches_a_hand_computation():
    """Reference 50/50, current 80/20 over two labels; every count gets 0.5 added."""
    ref, cur = {"a": 50, "b": 50}, {"a": 80, "b": 20}
    r = [50.5 / 101, 50.5 / 101]
    c = [80.5 / 101, 20.5 / 101]
    expected = sum((ci - ri) * math.log(ci / ri) for ri, ci in zip(r, c, strict=True))
    assert population_stability_index(ref, cur) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.4063, abs=1e-4)  # 0.297 ln 1.594 + 0.297 ln 2.463
    # a label seen on one side only stays finite
    assert math.isfinite(population_stability_index({"a": 10}, {"b": 10}))
    assert population_stability_index(ref, ref) == 0.0


def test_label_drift_counts_unseen_labels_as_zero_and_one_label_is_no_test():
    test = label_drift(["a"] * 50 + ["b"] * 50, ["a"] * 50 + ["c"] * 50)
    assert test.drifted and test.p_value < 1e-10
    assert test.reference["shares"] == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert test.current["shares"] == {"a": 0.5, "b": 0.0, "c": 0.5}
    assert test.describe().startswith("labels: PSI ") and test.describe().endswith(": drifted")
    single = label_drift(["a"] * 10, ["a"] * 30)
    assert single.p_value == 1.0 and single.effect == 0.0 and not single.drifted
    assert label_drift([], ["a"]).p_value is None


def test_share_drift_is_one_sided_and_exact_for_small_counts():
    up = share_drift("unknown_tokens", 10, 10_000, 300, 10_000)
    assert up.drifted and up.p_value < 1e-10
    assert up.statistic == pytest.approx(0.029)
    down = share_drift("unknown_tokens", 300, 10_000, 10, 10_000)
    assert not down.drifted and down.p_value > 0.99
    small = share_drift("truncation", 0, 20, 3, 20)  # expected counts < 5: Fisher's test
    assert small.p_value == pytest.approx(0.1154, abs=1e-3) and not small.drifted
    assert share_drift("truncation", 0, 100, 0, 100).p_value == 1.0
    assert share_drift("truncation", 0, 0, 1, 10).p_value is None
    with pytest.raises(ValueError, match="between 0 and the total"):
        share_drift("truncation", 5, 4, 0, 10)


def test_too_little_data_skips_a_test_with_its_reason():
    test = length_drift([3, 4, 5], list(range(40)))
    assert test.p_value is None and not test.drifted
    assert test.threshold == "skipped: fewer than 5 rows on a side (3 reference, 40 current)"
    assert test.describe() == f"length: {test.threshold}"
    assert mmd_drift(np.zeros((3, 4)), np.zeros((10, 4))).p_value is None
    report = drift_report(
        _frame(1, rows=3),
        _frame(2, rows=3),
        label_column=None,
        unk_id=None,
        max_length=MAX_LENGTH,
    )
    assert [t.name for t in report.tests] == ["length", "unknown_tokens", "truncation"]
    assert report.test("unknown_tokens").threshold.endswith("the tokenizer has no unknown token")
    assert report.describe() == "no drift (1 test, 2 skipped)"
    with pytest.raises(ValueError, match="no label column 'topic'"):
        drift_report(_frame(1), _frame(2), label_column="topic", unk_id=UNK, max_length=64)


def test_mmd_is_deterministic_for_a_seed_and_quiet_under_the_null():
    x, y = _embeddings(3, rows=60, width=8), _embeddings(4, rows=60, width=8)
    first = mmd_drift(x, y, permutations=200, seed=7)
    assert first == mmd_drift(x, y, permutations=200, seed=7)
    p_values = [
        mmd_drift(
            _embeddings(10 + i, rows=60, width=8),
            _embeddings(100 + i, rows=60, width=8),
            permutations=200,
            seed=i,
        ).p_value
        for i in range(12)
    ]
    assert min(p_values) > 0.01, p_values
    assert 0.2 < float(np.mean(p_values)) < 0.8, p_values


def test_mmd_caps_each_side_and_says_so():
    test = mmd_drift(_embeddings(1, rows=700, width=4), _embeddings(2, rows=40, width=4))
    assert test.reference["rows"] == 700 and test.reference["rows_used"] == MMD_MAX_ROWS
    assert test.current["rows"] == test.current["rows_used"] == 40
    with pytest.raises(ValueError, match="one width"):
        mmd_drift(np.zeros((10, 4)), np.zeros((10, 5)))


def test_token_statistics_count_unknown_tokens_and_truncated_rows():
    stats = token_statistics([[5, 1, 6], [1, 1, 7, 8], [9]], unk_id=1, max_length=4)
    assert stats["lengths"].tolist() == [3, 4, 1]
    assert (stats["unknown_hits"], stats["unknown_total"]) == (3, 8)
    assert (stats["truncated_hits"], stats["rows"]) == (1, 3)
    assert token_statistics([[1, 2]], unk_id=None, max_length=4)["unknown_hits"] == 0


def test_the_report_round_trips_through_json_and_renders():
    report = _report(
        _frame(2, shares=(0.6, 0.3, 0.1)),
        reference_emb=_embeddings(1, rows=50),
        current_emb=_embeddings(2, rows=50),
        permutations=50,
    )
    again = DriftReport.model_validate_json(report.model_dump_json())
    assert again == report
    assert again.drifted and again.describe() == report.describe()
    md = again.markdown()
    assert md.startswith("## Data drift\n")
    assert "| labels |" in md and "| embeddings |" in md and "**yes**" in md
    assert "![label shares and token lengths](data:image/svg+xml;base64," in md
    assert "data:image" not in again.markdown(charts=False)
    length = again.test("length")
    assert length.reference["bins"] == length.current["bins"]
    assert sum(length.reference["histogram"]) == 800
    widths = np.diff(length.reference["bins"])  # whole tokens, one width: no comb pattern
    assert len(widths) <= 30 and len(set(widths)) == 1 and widths[0] == int(widths[0])


def _texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return ["".join(e.itertext()) for e in root.iter() if e.tag.endswith("}text")]


def test_the_drift_chart_draws_with_and_without_labels():
    edges = [0.0, 10.0, 20.0, 30.0]
    both = drift_svg({"a": 0.5, "b": 0.5}, {"a": 0.8, "c": 0.2}, edges, [5, 10, 5], [1, 2, 30])
    assert "<svg" in both
    texts = _texts(both)
    assert "Label shares" in texts and "Token lengths" in texts and "c" in texts
    lengths_only = drift_svg(None, None, edges, [5, 10, 5], [1, 2, 30])
    assert "<svg" in lengths_only and "Label shares" not in _texts(lengths_only)
    labels_only = drift_svg({"a": 1.0}, {"a": 1.0})
    assert "Token lengths" not in _texts(labels_only)
    assert "no labels or lengths to compare" in _texts(drift_svg(None, None))
    assert both == drift_svg(
        {"a": 0.5, "b": 0.5}, {"a": 0.8, "c": 0.2}, edges, [5, 10, 5], [1, 2, 30]
    )
    with pytest.raises(ValueError, match="4 bin edges need 3 counts"):
        drift_svg(None, None, edges, [1, 2], [1, 2])


def _point(i: int, **extra) -> dict:
    return {
        "when": f"2026-12-0{i + 1}T08:00:00+00:00",
        "value": 0.8 - 0.02 * i,
        "low": 0.76 - 0.02 * i,
        "high": 0.84 - 0.02 * i,
        "label": f"v000{1 + i // 3} on 2026-12-0{i + 1}.csv",
        **extra,
    }


def test_the_metric_history_draws_one_point_and_many():
    one = metric_history_svg([_point(0, registered=0.82)], metric="f1")
    assert "<svg" in one and "v0001 on 2026-12-01.csv" in _texts(one)
    points = [
        _point(i, registered=0.82 if i < 3 else 0.79, degraded=i == 4, version=f"v000{1 + i // 3}")
        for i in range(5)
    ]
    many = metric_history_svg(points, metric="f1")
    texts = _texts(many)
    assert "<svg" in many and "f1 over time" in texts
    assert {"healthy", "degraded", "registered figure"} <= set(texts)
    assert "#d62728" in many  # the degraded point's colour
    assert many.count("stroke-dasharray") >= 2  # a registered line per version
    assert "no checks yet" in _texts(metric_history_svg([]))
    # missing intervals and values are tolerated
    sparse = metric_history_svg(
        [{"when": "2026-12-01", "value": 0.5}, {"when": "x", "value": None}]
    )
    assert "2026-12-01" in _texts(sparse)


# ----------------------------------------------------------------------------- embed


class _Tokenizer:
    pad_token_id = 0


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )


def test_embed_mean_pools_and_ignores_padding():
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(_bert_config())  # built in training mode: embed must not use dropout
    ids = [[2, 7, 9, 3], [2, 11, 3], [2, 5, 6, 7, 8, 9, 10, 3]]
    batched = embed(model, _Tokenizer(), ids, batch_size=8)
    assert batched.shape == (3, 16) and batched.dtype == np.float32
    alone = np.stack([embed(model, _Tokenizer(), [seq])[0] for seq in ids])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert model.training  # mode restored
    again = embed(model, None, ids, batch_size=2)  # no tokenizer: pad with 0
    np.testing.assert_allclose(again, batched, atol=1e-5)
    assert embed(model, _Tokenizer(), []).shape == (0, 16)


def test_embed_works_with_a_classifier_and_a_causal_lm():
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config

    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(_bert_config())
    ids = [[2, 7, 9, 3], [2, 11, 3]]
    assert embed(classifier, _Tokenizer(), ids).shape == (2, 16)
    gpt = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    )
    out = embed(gpt, _Tokenizer(), ids)
    assert out.shape == (2, 16) and np.isfinite(out).all()
