"""domaintune.evidence: per-example statistics reproduce each task type's figures, bootstrap
intervals, paired tests (bootstrap and McNemar) and the pairing of two predictions frames.
Prediction frames are built by hand: no model is trained or run."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from domaintune.evidence import (
    Comparison,
    ExampleStats,
    Interval,
    align,
    bootstrap_interval,
    mean_stats,
    paired_comparison,
)
from domaintune.tasktypes import get_task_type
from domaintune.tasktypes.question_answering import question_scores
from domaintune.tasktypes.text_classification import classification_metrics


def summed(stats: ExampleStats) -> float:
    """Sum the rows, then combine: the figure the statistics stand for."""
    return float(stats.combine(stats.values.sum(axis=0)))


def accuracy_stats(correct) -> ExampleStats:
    correct = np.asarray(correct, dtype=float)
    return mean_stats(correct)


# -- each task type's statistics give its own figures ------------------------------------
def classification_frame(seed: int = 0, n: int = 120) -> tuple[pd.DataFrame, list[str]]:
    """Four labels: one never predicted (d), predictions mostly right."""
    labels = ["a", "b", "c", "d"]
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 4, size=n)
    preds = np.where(rng.random(n) < 0.7, refs, rng.integers(0, 3, size=n))
    frame = pd.DataFrame(
        {
            "text": [f"t{i}" for i in range(n)],
            "label": [labels[i] for i in refs],
            "_row": np.arange(n),
            "_source": "f.csv",
            "predicted": [labels[i] for i in preds],
            "confidence": 0.9,
        }
    )
    return frame, labels


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "weighted_f1"])
def test_classification_statistics_give_the_reported_metrics(metric):
    task = get_task_type("text_classification")
    frame, labels = classification_frame()
    index = {lab: i for i, lab in enumerate(labels)}
    expected = classification_metrics(
        frame["label"].map(index), frame["predicted"].map(index), labels
    )
    stats = task.example_statistics(frame, metric, labels)
    assert stats is not None and stats.n == len(frame)
    assert summed(stats) == pytest.approx(expected[metric], abs=1e-12)
    assert stats.metric() == pytest.approx(expected[metric], abs=1e-12)


def test_classification_with_a_class_absent_from_the_split_averages_over_all_labels():
    task = get_task_type("text_classification")
    labels = ["neg", "neu", "pos"]
    frame = pd.DataFrame(
        {"label": ["neg", "pos", "pos", "neg"], "predicted": ["neg", "pos", "neg", "neg"]}
    )
    expected = classification_metrics([0, 2, 2, 0], [0, 2, 0, 0], labels)
    assert expected["macro_f1"] < 1.0
    for metric in ("macro_f1", "weighted_f1"):
        stats = task.example_statistics(frame, metric, labels)
        assert summed(stats) == pytest.approx(expected[metric], abs=1e-12)
    assert task.example_statistics(frame, "perplexity", labels) is None
    with pytest.raises(ValueError, match="'other' is not one of"):
        task.example_statistics(frame.assign(predicted="other"), "accuracy", labels)


def test_ner_statistics_give_seqevals_figures():
    task = get_task_type("token_classification")
    labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    refs = [
        ["B-PER", "I-PER", "O", "B-ORG"],
        ["O", "O", "O"],
        ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"],
        [],
        ["B-PER", "O", "B-PER", "I-PER"],
    ]
    preds = [
        ["B-PER", "I-PER", "O", "B-PER"],  # one right, one wrong type
        ["O", "B-ORG", "O"],  # a spurious entity
        ["B-ORG", "I-ORG", "O", "O", "B-PER"],  # a short span: wrong, and one right
        [],
        ["I-PER", "O", "B-PER", "O"],  # an I- starting an entity counts; a cut span
    ]
    frame = pd.DataFrame(
        {
            "text": ["s"] * len(refs),
            "_row": range(len(refs)),
            "_source": "f.conll",
            "tags": [" ".join(r) for r in refs],
            "predicted": [" ".join(p) for p in preds],
        }
    )
    expected = task.compute_metrics(preds, refs, labels)
    for metric in task.metrics:
        stats = task.example_statistics(frame, metric, labels)
        assert stats is not None and stats.n == len(frame), metric
        assert summed(stats) == pytest.approx(expected[metric], abs=1e-12), metric
    assert 0 < expected["entity_f1"] < 1


def test_qa_statistics_give_squads_figures_from_the_columns_or_the_answers():
    task = get_task_type("question_answering")
    refs = [["Acme Corp"], ["42", "forty-two"], [], ["the board"], ["Globex Inc"]]
    preds = ["Acme Corp shares", "forty-two", "", "a board", "Initech"]
    em, f1 = question_scores(preds, refs)
    frame = pd.DataFrame(
        {
            "question": ["q"] * 5,
            "_row": range(5),
            "_source": "qa.jsonl",
            "answers": [" | ".join(r) for r in refs],
            "predicted": preds,
            "exact_match": em,
            "f1": f1,
        }
    )
    expected = task.compute_metrics(preds, refs, [])
    for metric in ("exact_match", "f1"):
        stats = task.example_statistics(frame, metric, [])
        assert summed(stats) == pytest.approx(expected[metric], abs=1e-12)
        older = task.example_statistics(frame.drop(columns=["exact_match", "f1"]), metric, [])
        assert summed(older) == pytest.approx(expected[metric], abs=1e-12)


def generation_frame() -> pd.DataFrame:
    refs = [
        "The quarterly revenue rose by ten percent.",
        "Please restart the router and try again.",
        "Le chat est sur la table.",
        "Net income fell sharply in the second half.",
        "Thank you for contacting support.",
    ]
    preds = [
        "Quarterly revenue rose ten percent.",
        "Restart your router, then try again.",
        "Le chien est sous la table.",
        "Net income rose in the first half.",
        "",
    ]
    return pd.DataFrame(
        {
            "prompt": ["p"] * 5,
            "reference": refs,
            "_row": range(5),
            "_source": "chat.jsonl",
            "predicted": preds,
        }
    )


@pytest.mark.parametrize(
    ("task_name", "metric"),
    [
        ("instruction_tuning", "rougeL"),
        ("instruction_tuning", "bleu"),
        ("translation", "chrf"),
        ("translation", "bleu"),
        ("translation", "rougeL"),
    ],
)
def test_generation_statistics_give_the_corpus_figures(task_name, metric):
    task = get_task_type(task_name)
    frame = generation_frame()
    expected = task.compute_metrics(frame["predicted"], frame["reference"], [])
    stats = task.example_statistics(frame, metric, [])
    assert stats is not None and stats.n == 5
    assert summed(stats) == pytest.approx(expected[metric], abs=1e-12)
    assert 0 < expected[metric] < 1
    # a resample is scored as the corpus is: any weights give the figure of that corpus
    twice = stats.combine(np.array([2.0, 0, 1, 1, 1]) @ stats.values)
    doubled = pd.concat([frame.iloc[[0, 0, 2, 3, 4]]])
    again = task.compute_metrics(doubled["predicted"], doubled["reference"], [])
    assert float(twice) == pytest.approx(again[metric], abs=1e-12)


def test_generation_statistics_of_an_empty_split_score_zero():
    task = get_task_type("translation")
    empty = generation_frame().iloc[:0]
    for metric in task.metrics:
        stats = task.example_statistics(empty, metric, [])
        assert stats.n == 0 and stats.metric() == 0.0


def test_language_model_statistics_give_the_perplexity():
    causal = get_task_type("causal_lm")
    nll = np.array([120.5, 98.25, 40.0, 0.0])
    tokens = np.array([63, 63, 20, 0])
    frame = pd.DataFrame(
        {"block": range(4), "tokens": tokens, "loss": nll / np.maximum(tokens, 1), "nll": nll}
    )
    expected = causal.compute_metrics(nll.sum(), tokens.sum(), [])["perplexity"]
    assert summed(causal.example_statistics(frame, "perplexity", [])) == pytest.approx(expected)
    older = frame.drop(columns=["nll"])  # scored before the column existed: loss x tokens
    assert summed(causal.example_statistics(older, "perplexity", [])) == pytest.approx(expected)
    assert causal.example_statistics(frame, "loss", []) is None

    masked = get_task_type("masked_lm")
    correct = np.array([30, 40, 10, 0])
    frame = pd.DataFrame(
        {
            "block": range(4),
            "masked_tokens": tokens,
            "loss": nll / np.maximum(tokens, 1),
            "correct": correct,
            "nll": nll,
        }
    )
    expected = masked.compute_metrics((nll.sum(), correct.sum()), tokens.sum(), [])
    for metric in masked.metrics:
        stats = masked.example_statistics(frame, metric, [])
        assert summed(stats) == pytest.approx(expected[metric], rel=1e-12), metric


# -- bootstrap intervals -------------------------------------------------------------------
def test_interval_contains_the_point_narrows_with_n_and_repeats_with_its_seed():
    rng = np.random.default_rng(1)
    small = accuracy_stats(rng.random(100) < 0.8)
    large = accuracy_stats(rng.random(5000) < 0.8)
    a = bootstrap_interval(small, resamples=1000, seed=3)
    b = bootstrap_interval(large, resamples=1000, seed=3)
    for interval, stats in ((a, small), (b, large)):
        assert interval.low <= interval.point <= interval.high
        assert interval.point == pytest.approx(stats.metric())
        assert interval.n == stats.n
    assert (b.high - b.low) < (a.high - a.low) / 3
    assert bootstrap_interval(small, resamples=1000, seed=3) == a
    scores = mean_stats(rng.normal(size=300))  # continuous: another seed moves the ends
    assert bootstrap_interval(scores, seed=5) == bootstrap_interval(scores, seed=5)
    assert bootstrap_interval(scores, seed=5) != bootstrap_interval(scores, seed=6)
    assert a.describe() == f"{a.point:.3f} [{a.low:.3f}, {a.high:.3f}]"
    assert Interval.model_validate_json(a.model_dump_json()) == a


def test_interval_of_a_corpus_metric_and_of_no_examples():
    task = get_task_type("text_classification")
    frame, labels = classification_frame(n=300)
    stats = task.example_statistics(frame, "macro_f1", labels)
    interval = bootstrap_interval(stats, confidence=0.9, resamples=500)
    assert interval.low < interval.point < interval.high
    assert interval.confidence == 0.9
    empty = bootstrap_interval(accuracy_stats([]))
    assert (empty.point, empty.low, empty.high, empty.n) == (0.0, 0.0, 0.0, 0)


def test_resampling_fifty_thousand_examples_stays_within_fifty_megabytes():
    stats = accuracy_stats(np.random.default_rng(0).random(50_000) < 0.7)
    tracemalloc.start()
    try:
        interval = bootstrap_interval(stats, resamples=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024, peak
    assert interval.high - interval.low < 0.02


# -- paired tests --------------------------------------------------------------------------
def champion_correct(n: int = 200, right: int = 140) -> np.ndarray:
    correct = np.zeros(n)
    correct[np.random.default_rng(7).permutation(n)[:right]] = 1.0
    return correct


@pytest.mark.parametrize("test", ["paired_bootstrap", "mcnemar"])
def test_two_examples_better_is_no_evidence_forty_is(test):
    old = champion_correct()
    wrong = np.flatnonzero(old == 0)
    slightly = old.copy()
    slightly[wrong[:2]] = 1.0
    much = old.copy()
    much[wrong[:40]] = 1.0
    weak = paired_comparison(accuracy_stats(old), accuracy_stats(slightly), test=test)
    strong = paired_comparison(accuracy_stats(old), accuracy_stats(much), test=test)
    assert weak.test == strong.test == test
    assert weak.p_value > 0.05
    assert strong.p_value < 0.01
    assert weak.difference == pytest.approx(0.01)
    assert strong.difference == pytest.approx(0.2)
    assert strong.interval[0] > 0 and strong.interval[0] <= 0.2 <= strong.interval[1]
    assert (strong.champion, strong.challenger) == (pytest.approx(0.7), pytest.approx(0.9))


def test_mcnemar_is_the_exact_binomial_of_the_discordant_pairs():
    old = champion_correct(100, 60)
    new = old.copy()
    right_old, wrong_old = np.flatnonzero(old == 1), np.flatnonzero(old == 0)
    new[wrong_old[:7]] = 1.0  # b = 7: the challenger right where the champion is wrong
    new[right_old[:2]] = 0.0  # c = 2
    result = paired_comparison(accuracy_stats(old), accuracy_stats(new))  # auto: accuracy
    assert result.test == "mcnemar"
    assert result.discordant == (7, 2)
    # P(X >= 7), X ~ Binomial(9, 1/2)
    expected = sum(math.comb(9, k) for k in range(7, 10)) / 2**9
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    assert result.p_value == pytest.approx(46 / 512)
    assert result.difference == pytest.approx(0.05)
    same = paired_comparison(accuracy_stats(old), accuracy_stats(old), test="mcnemar")
    assert same.p_value == 1.0 and same.discordant == (0, 0)


def test_auto_bootstraps_other_metrics_and_mcnemar_refuses_them():
    task = get_task_type("text_classification")
    frame, labels = classification_frame(n=200)
    better = frame.assign(predicted=frame["label"])
    old = task.example_statistics(frame, "macro_f1", labels)
    new = task.example_statistics(better, "macro_f1", labels)
    result = paired_comparison(old, new, metric_name="macro_f1", resamples=500)
    assert result.test == "paired_bootstrap" and result.discordant is None
    assert result.p_value == pytest.approx(1 / 501)
    with pytest.raises(ValueError, match="mcnemar needs"):
        paired_comparison(old, new, test="mcnemar", metric_name="macro_f1")
    with pytest.raises(ValueError, match="same examples"):
        paired_comparison(old, new.take(range(10)), metric_name="macro_f1")


def test_a_lower_perplexity_is_better_and_the_result_is_deterministic_json():
    causal = get_task_type("causal_lm")
    rng = np.random.default_rng(2)
    tokens = np.full(150, 64.0)
    old_nll = rng.normal(3.0, 0.3, 150) * tokens
    new_nll = old_nll - rng.normal(0.2, 0.1, 150) * tokens

    def stats(nll):
        frame = pd.DataFrame({"block": range(150), "tokens": tokens, "loss": 0.0, "nll": nll})
        return causal.example_statistics(frame, "perplexity", [])

    result = paired_comparison(
        stats(old_nll), stats(new_nll), higher_is_better=False, metric_name="perplexity"
    )
    assert result.test == "paired_bootstrap"
    assert result.challenger < result.champion
    assert result.difference == pytest.approx(result.champion - result.challenger)
    assert result.difference > 0 and result.interval[0] > 0 and result.p_value < 0.01
    again = paired_comparison(
        stats(old_nll), stats(new_nll), higher_is_better=False, metric_name="perplexity"
    )
    assert again == result
    assert Comparison.model_validate_json(result.model_dump_json()) == result
    assert "perplexity \u2212" in result.describe() and "(lower is better)" in result.describe()


def test_describe_is_one_short_line():
    result = Comparison(
        test="paired_bootstrap",
        metric="macro_f1",
        n=178,
        champion=0.80,
        challenger=0.821,
        difference=0.021,
        interval=(-0.004, 0.046),
        p_value=0.07,
        confidence=0.95,
    )
    assert result.describe() == (
        "paired bootstrap on 178 examples: macro_f1 +0.021 [\u22120.004, +0.046], p = 0.07"
    )


# -- pairing two frames --------------------------------------------------------------------
def test_align_pairs_rows_by_their_keys_in_the_first_frames_order():
    a = pd.DataFrame(
        {
            "_source": ["x.csv", "x.csv", "y.csv", "y.csv"],
            "_row": [0, 1, 0, 1],
            "predicted": ["a0", "a1", "a2", "a3"],
        }
    )
    b = pd.DataFrame(
        {
            "_source": ["y.csv", "x.csv", "z.csv", "y.csv"],
            "_row": [1, 0, 0, 0],
            "predicted": ["b3", "b0", "bz", "b2"],
        }
    )
    left, right = align(a, b)
    assert left["predicted"].tolist() == ["a0", "a2", "a3"]
    assert right["predicted"].tolist() == ["b0", "b2", "b3"]
    assert (left[["_source", "_row"]].to_numpy() == right[["_source", "_row"]].to_numpy()).all()
    assert list(left.index) == list(right.index) == [0, 1, 2]
    with pytest.raises(ValueError, match="more than one row"):
        align(pd.concat([a, a.iloc[:1]]), b)
    with pytest.raises(ValueError, match="share none of the keys"):
        align(a[["predicted"]], b)


def test_align_uses_the_example_number_where_both_frames_have_it():
    a = pd.DataFrame({"_source": "f", "_row": [0, 0], "_example": [0, 1], "p": [1, 2]})
    b = pd.DataFrame({"_source": "f", "_row": [0, 0], "_example": [1, 0], "p": [3, 4]})
    left, right = align(a, b)
    assert left["p"].tolist() == [1, 2] and right["p"].tolist() == [4, 3]


def test_the_base_task_type_resamples_nothing():
    from domaintune.tasktypes.base import TaskType

    assert TaskType.example_statistics(get_task_type("causal_lm"), pd.DataFrame(), "x", []) is None
