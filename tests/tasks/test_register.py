"""The promotion gate's rules, and the registry commands over a real registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.cli import main as cli
from domaintune.promotion import decide_promotion
from domaintune.registry import Registry
from domaintune.storage.manifests import EvaluationReport
from domaintune.storage.store import Store
from domaintune.tasks.evaluate import evaluate
from domaintune.tasks.finetune import finetune
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.register import register
from tests.conftest import write_csv


def _per_class(f1s: dict[str, float]) -> dict:
    return {k: {"precision": v, "recall": v, "f1": v, "support": 10} for k, v in f1s.items()}


def _report(
    new: float, base: float, champion: dict | None = None, per_class=None, metric="macro_f1"
):
    finetuned = {metric: new, "per_class": _per_class(per_class or {})}
    return EvaluationReport(
        key="k",
        path="p",
        fingerprint="f",
        primary_metric=metric,
        finetuned=finetuned,
        base={metric: base},
        gain={metric: new - base},
        test_rows=100,
        champion=champion,
        metrics_json="m",
        report_markdown="r",
    )


CHAMPION = {"version": "v0001", "metrics": {"macro_f1": 0.70}}


def _rescored(value: float, per_class=None) -> dict:
    return {
        "version": "v0001",
        "metrics": {"macro_f1": value, "per_class": _per_class(per_class or {})},
    }


@pytest.mark.parametrize(
    "promotion, report, champion, promoted, reason",
    [
        ({}, _report(0.50, 0.60), None, False, "does not beat the base model's 0.6000"),
        ({"min_gain_over_base": 0.2}, _report(0.75, 0.60), None, False, "by 0.2"),
        ({"min_primary_metric": 0.8}, _report(0.75, 0.30), None, False, "below the floor of 0.8"),
        ({}, _report(0.75, 0.30), None, True, "first champion"),
        # the champion re-scored on this test split is what counts, not its old figure
        ({}, _report(0.75, 0.3, _rescored(0.78)), CHAMPION, False, "(0.7800 on this test split)"),
        ({}, _report(0.75, 0.3, _rescored(0.75)), CHAMPION, False, "does not beat champion v0001"),
        (
            {"margin_over_champion": 0.05},
            _report(0.78, 0.3, _rescored(0.75)),
            CHAMPION,
            False,
            "by 0.05",
        ),
        ({}, _report(0.78, 0.3, _rescored(0.75)), CHAMPION, True, "beats champion v0001"),
        # not re-scorable (labels changed): the recorded figure, and the reason says so
        (
            {},
            _report(0.72, 0.3, {"version": "v0001", "metrics": None, "note": "labels differ"}),
            CHAMPION,
            True,
            "as recorded (labels differ)",
        ),
        # better on average, but one class collapses
        (
            {"max_class_regression": 0.05},
            _report(0.80, 0.3, _rescored(0.75, {"a": 0.9, "b": 0.6}), {"a": 0.95, "b": 0.5}),
            CHAMPION,
            False,
            "class 'b' F1 falls from 0.6000 (champion v0001) to 0.5000",
        ),
        (
            {"max_class_regression": 0.15},
            _report(0.80, 0.3, _rescored(0.75, {"a": 0.9, "b": 0.6}), {"a": 0.95, "b": 0.5}),
            CHAMPION,
            True,
            "beats champion",
        ),
    ],
)
def test_promotion_rules(make_config, tmp_path, promotion, report, champion, promoted, reason):
    cfg = make_config(tmp_path / "x.csv", promotion=promotion)
    ok, why = decide_promotion(cfg, report, champion)
    assert ok is promoted and reason in why, why


def test_perplexity_floor_is_a_ceiling(make_config, tmp_path):
    cfg = make_config(
        tmp_path / "x.csv",
        task={"type": "causal_lm", "labels": None},
        evaluation={"primary_metric": "perplexity"},
        promotion={"min_primary_metric": 20.0},
    )
    ok, why = decide_promotion(cfg, _report(25.0, 30.0, metric="perplexity"), None)
    assert not ok and "above the ceiling of 20.0" in why
    ok, _ = decide_promotion(cfg, _report(18.0, 30.0, metric="perplexity"), None)
    assert ok


@pytest.mark.slow
def _train_and_register(cfg, store):
    """(evaluation, registration) of one run of the stages as plain functions."""
    raw = ingest(cfg, store)
    splits = preprocess(cfg, raw, store)
    model = finetune(cfg, splits, store)
    evaluation = evaluate(cfg, splits, model, store)
    return evaluation, register(cfg, raw, splits, model, evaluation, store)


def test_champion_is_rescored_and_the_registry_commands_promote_and_roll_back(
    tmp_path, make_config, rows, capsys
):
    src = write_csv(tmp_path / "d.csv", rows(30))
    first = make_config(src)
    store = Store(first.store.root)

    def run(cfg):
        return _train_and_register(cfg, store)

    ev1, v1 = run(first)
    assert v1.promoted and ev1.champion is None
    ev2, v2 = run(make_config(src, training={"epochs": 3}))
    # the same test split: the champion re-scored reproduces its registered figures
    assert ev2.champion["version"] == "v0001"
    assert ev2.champion["metrics"]["accuracy"] == pytest.approx(v1.metrics["accuracy"])
    assert ev2.champion["metrics"]["macro_f1"] == pytest.approx(v1.metrics["macro_f1"])
    assert ("champion v0001" in v2.promotion_reason) or not v2.promoted
    root = ["--store", first.store.root]

    assert cli(["models", "list", "test-uc", "--json", *root]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in listed] == ["v0001", "v0002"]
    assert sum(r["status"] == "champion" for r in listed) == 1
    other = "v0001" if v2.promoted else "v0002"
    assert cli(["models", "promote", "test-uc", other, *root]) == 0
    reg = Path(v1.registry_dir)
    assert (reg / "production").read_text() == other
    assert cli(["models", "rollback", "test-uc", *root]) == 0
    assert (reg / "production").read_text() != other
    assert Registry(store, "test-uc").state().stack[-1] == (reg / "production").read_text()
    capsys.readouterr()
    assert cli(["models", "show", "test-uc", "v0002", "--json", *root]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"]["model"]["fingerprint"] and shown["config"]["name"] == "test-uc"
    assert cli(["models", "show", "test-uc", "v0009", *root]) == 2
    assert "no registered version 'v0009' (known: v0001, v0002)" in capsys.readouterr().err


def test_a_champion_with_another_tokenizer_is_not_scored_on_this_runs_token_ids(
    tmp_path, make_config, rows, other_tokenizer_model
):
    """The test split holds token ids of the run's tokenizer: a champion trained with another
    tokenizer would read them as other words (seen: a MiniLM champion scored macro-F1 0.29
    on an MPNet run's split, 0.83 when registered). It is compared on its recorded metrics."""
    src = write_csv(tmp_path / "d.csv", rows(30))
    first = make_config(src)
    store = Store(first.store.root)

    def run(cfg):
        return _train_and_register(cfg, store)

    _, v1 = run(first)
    ev2, v2 = run(make_config(src, model={"name_or_path": str(other_tokenizer_model)}))
    assert ev2.champion["version"] == "v0001" and ev2.champion["metrics"] is None
    assert ev2.champion["note"] == (
        "it was trained with another tokenizer; compared on its recorded metrics"
    )
    assert "as recorded (it was trained with another tokenizer" in v2.promotion_reason
    assert not list((Path(first.store.root) / "evaluate_champion").glob("*/metrics.json"))
