"""The classification metrics are computed in NumPy (importing scikit-learn inside the
training loop cost 5% of a run); they must be scikit-learn's figures, edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from domaintune.tasktypes.text_classification import classification_metrics


def sklearn_metrics(refs, preds, labels):
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(refs, preds, labels=ids, zero_division=0)
    return {
        "accuracy": accuracy_score(refs, preds),
        "macro_f1": f1_score(refs, preds, labels=ids, average="macro", zero_division=0),
        "weighted_f1": f1_score(refs, preds, labels=ids, average="weighted", zero_division=0),
        "per_class": {
            lab: {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(refs, preds, labels=ids).tolist(),
    }


def assert_same(ours, theirs):
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key
    for lab, row in theirs["per_class"].items():
        for key, value in row.items():
            assert ours["per_class"][lab][key] == pytest.approx(value, abs=1e-12), (lab, key)
    assert ours["confusion_matrix"]["matrix"] == theirs["confusion_matrix"]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=6).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(
                st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                min_size=1,
                max_size=60,
            ),
        )
    )
)
def test_metrics_equal_scikit_learns(case):
    n, pairs = case
    labels = [f"class{i}" for i in range(n)]
    refs, preds = (np.array(x) for x in zip(*pairs, strict=True))
    assert_same(classification_metrics(refs, preds, labels), sklearn_metrics(refs, preds, labels))


def test_a_class_never_predicted_and_one_never_present_score_zero():
    labels = ["negative", "neutral", "positive"]
    refs, preds = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])  # no "positive" anywhere
    ours = classification_metrics(refs, preds, labels)
    assert ours["per_class"]["positive"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    assert ours["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert_same(ours, sklearn_metrics(refs, preds, labels))
