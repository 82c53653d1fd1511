"""Promotion on evidence: the paired test on the same test rows, and the forgetting guard."""

from __future__ import annotations

import numpy as np
import pandas as pd

from domaintune.promotion import PairedPredictions, decide_promotion, gather_evidence
from domaintune.storage.manifests import EvaluationReport

LABELS = ["negative", "neutral", "positive"]


def _frame(correct: np.ndarray, sources: list[str]) -> pd.DataFrame:
    """Predictions of a classifier: right where ``correct``, else the next label."""
    truth = [LABELS[i % 3] for i in range(len(correct))]
    predicted = [
        t if c else LABELS[(LABELS.index(t) + 1) % 3] for t, c in zip(truth, correct, strict=True)
    ]
    return pd.DataFrame(
        {
            "text": [f"t{i}" for i in range(len(correct))],
            "label": truth,
            "_row": range(1, len(correct) + 1),
            "_source": sources,
            "predicted": predicted,
            "confidence": 0.9,
        }
    )


def _report(champion: pd.DataFrame, challenger: pd.DataFrame) -> EvaluationReport:
    acc = {"champion": (champion.label == champion.predicted).mean()}
    acc["challenger"] = (challenger.label == challenger.predicted).mean()
    return EvaluationReport(
        key="k",
        path="p",
        fingerprint="f",
        primary_metric="accuracy",
        finetuned={"accuracy": float(acc["challenger"])},
        base={"accuracy": 0.3},
        gain={"accuracy": float(acc["challenger"]) - 0.3},
        test_rows=len(champion),
        champion={"version": "v0001", "metrics": {"accuracy": float(acc["champion"])}},
        metrics_json="m",
        report_markdown="r",
    )


def _decide(make_config, champion, challenger, earlier=(), **sections):
    cfg = make_config("data.csv", **sections)
    paired = PairedPredictions(champion, challenger, frozenset(earlier), tuple(LABELS))
    report = _report(champion, challenger)
    evidence = gather_evidence(cfg, report, paired)
    ok, why = decide_promotion(cfg, report, {"version": "v0001"}, evidence)
    return ok, why, evidence


def test_better_by_noise_is_not_promoted_clearly_better_is(make_config):
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.7
    sources = ["a.csv"] * 200
    noisy = base.copy()
    noisy[np.flatnonzero(~base)[:2]] = True  # right on 2 more of 200
    ok, why, evidence = _decide(make_config, _frame(base, sources), _frame(noisy, sources))
    assert not ok and "no more than chance" in why and "McNemar" in why, why
    assert evidence.overall.p_value > 0.05

    clear = base.copy()
    clear[np.flatnonzero(~base)[:40]] = True  # right on 40 more
    ok, why, evidence = _decide(make_config, _frame(base, sources), _frame(clear, sources))
    assert ok and "beats champion v0001" in why and ", p " in why, why
    assert evidence.overall.p_value < 0.01

    # significance: null compares the point estimates, as before
    ok, why, _ = _decide(
        make_config, _frame(base, sources), _frame(noisy, sources), promotion={"significance": None}
    )
    assert ok, why


def test_a_challenger_from_the_champion_that_forgets_is_not_promoted(make_config):
    """Better overall and on the new rows, but worse on the champion's own test rows."""
    n_old, n_new = 60, 240
    sources = ["old.csv"] * n_old + ["new.csv"] * n_new
    champ = np.r_[np.ones(n_old, bool), np.zeros(n_new, bool)]
    champ[n_old::2] = True  # half right on the new rows
    chall = np.r_[np.zeros(n_old, bool), np.ones(n_new, bool)]
    chall[: n_old // 2] = True  # forgot half of the old rows
    champion, challenger = _frame(champ, sources), _frame(chall, sources)
    ok, why, evidence = _decide(
        make_config, champion, challenger, earlier={"old.csv"}, retrain={"start_from": "champion"}
    )
    assert evidence.earlier.difference < -0.4 and evidence.new.difference > 0.4
    assert not ok and why.startswith("forgetting: trained from champion v0001"), why
    # from the base model the guard does not apply (the significant gain decides)
    ok, why, _ = _decide(make_config, champion, challenger, earlier={"old.csv"})
    assert ok, why
