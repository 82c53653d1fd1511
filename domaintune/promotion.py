"""The promotion gate: whether a registered candidate becomes the production version.

Beside the registry (domaintune.registry), which records the decision; the register stage
(tasks/register.py) asks, the CLI's ``models promote`` overrides it by hand.

Against a champion, point estimates are not enough: on a test split of a few hundred rows a
one-row difference would decide. With ``promotion.significance`` set, the challenger and the
champion's per-example predictions on the same test rows go through a paired test
(domaintune.evidence: McNemar's exact test for accuracy, else a paired bootstrap of the
primary metric), and the challenger is promoted only when it is better at that level. A
challenger trained from the champion (``retrain.start_from: champion``) must also not fall
behind it on the champion's own test rows nor on the new files' rows (forgetting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from pydantic import BaseModel

from domaintune.config import RetrainConfig
from domaintune.evidence import Comparison, align, paired_comparison
from domaintune.storage.manifests import EvaluationReport
from domaintune.tasktypes import get_task_type


@dataclass(frozen=True)
class PairedPredictions:
    """Champion and challenger per-example predictions on the same test split, and the
    files the champion was trained on (test rows from them are its own test rows; the
    others came with files that landed since)."""

    champion: pd.DataFrame
    challenger: pd.DataFrame
    earlier_sources: frozenset[str]
    labels: tuple[str, ...] = ()


class Evidence(BaseModel):
    """The paired comparisons of challenger and champion: on the whole test split, and on
    its rows from the champion's training files (``earlier``) and from newer files
    (``new``), where both have rows. ``note``: why there is no test (then the point
    estimates decide)."""

    overall: Comparison | None = None
    earlier: Comparison | None = None
    new: Comparison | None = None
    note: str | None = None


def gather_evidence(
    config: RetrainConfig, evaluation: EvaluationReport, paired: PairedPredictions | None
) -> Evidence:
    """The paired tests ``decide_promotion`` reads (no test without per-example
    predictions of both, or for a metric the task type cannot resample per example)."""
    if paired is None:
        return Evidence(note="the champion was not re-scored on this test split")
    task = get_task_type(config.task.type)
    metric = evaluation.primary_metric
    labels = list(paired.labels)
    try:
        champ, chall = align(paired.champion, paired.challenger)
    except ValueError as exc:  # no per-example keys both share (perplexity blocks, say)
        return Evidence(note=f"no paired test: {exc}")
    if champ.empty:
        return Evidence(note="no test row is in both models' predictions")
    rules = config.promotion
    higher = metric not in task.lower_is_better

    def compare(mask: pd.Series | None) -> Comparison | None:
        a = champ if mask is None else champ[mask.to_numpy()]
        b = chall if mask is None else chall[mask.to_numpy()]
        if a.empty:
            return None
        sa = task.example_statistics(a.reset_index(drop=True), metric, labels)
        sb = task.example_statistics(b.reset_index(drop=True), metric, labels)
        if sa is None or sb is None:
            return None
        return paired_comparison(
            sa,
            sb,
            higher_is_better=higher,
            test=rules.test,
            metric_name=metric,
            resamples=rules.bootstrap_resamples,
            seed=config.evaluation.split_seed,
        )

    overall = compare(None)
    if overall is None:
        return Evidence(note=f"{metric} cannot be resampled per example: point estimates decide")
    earlier = None
    new = None
    if "_source" in champ.columns and paired.earlier_sources:
        mine = champ["_source"].isin(paired.earlier_sources)
        if mine.any() and (~mine).any():
            earlier, new = compare(mine), compare(~mine)
    return Evidence(overall=overall, earlier=earlier, new=new)


def decide_promotion(
    config: RetrainConfig,
    evaluation: EvaluationReport,
    champion: dict[str, Any] | None,
    evidence: Evidence | None = None,
) -> tuple[bool, str]:
    """(promote?, why). In order: beat the base model by ``min_gain_over_base``; clear the
    absolute ``min_primary_metric`` (a ceiling for perplexity); beat the champion, re-scored
    on this run's test split, by ``margin_over_champion``, and significantly (``evidence``,
    at ``promotion.significance``); no forgetting when trained from the champion; and no
    class or entity type F1 below the champion's by more than ``max_class_regression``."""
    rules = config.promotion
    m = evaluation.primary_metric
    lower = m in get_task_type(config.task.type).lower_is_better
    sign = -1.0 if lower else 1.0  # compare as "higher is better"
    new = evaluation.finetuned[m]
    base = evaluation.base[m]
    need = rules.min_gain_over_base
    if sign * (new - base) < need or sign * (new - base) <= 0:
        return False, f"{m} {new:.4f} does not beat the base model's {base:.4f} by {need}"
    floor = rules.min_primary_metric
    if floor is not None and sign * (new - floor) < 0:
        bound = "above the ceiling" if sign < 0 else "below the floor"
        return False, f"{m} {new:.4f} is {bound} of {floor} (promotion.min_primary_metric)"
    if champion is None:
        return True, f"first champion: {m} {new:.4f} (base {base:.4f})"
    scored = evaluation.champion or {}
    champ_metrics = scored.get("metrics")
    if champ_metrics:
        champ, where = champ_metrics[m], "on this test split"
    else:
        champ = champion.get("metrics", {}).get(m)
        where = f"as recorded ({scored.get('note', 'not re-scored')})"
    name = champion["version"]
    margin = rules.margin_over_champion
    if champ is not None and (sign * (new - champ) <= 0 or sign * (new - champ) < margin):
        return (
            False,
            f"{m} {new:.4f} does not beat champion {name} ({champ:.4f} {where}) by {margin}",
        )
    if config.retrain.start_from == "champion" and evidence is not None:
        tol = config.retrain.forgetting_tolerance
        for part, what in ((evidence.earlier, "its own test rows"), (evidence.new, "new rows")):
            if part is not None and part.difference < -tol:
                return False, (
                    f"forgetting: trained from champion {name}, it falls behind it on {what} "
                    f"by more than retrain.forgetting_tolerance {tol}: {part.describe()}"
                )
    proof = evidence.overall if evidence is not None else None
    if rules.significance is not None and proof is not None:
        if proof.p_value >= rules.significance:
            return False, (
                f"{m} {new:.4f} beats champion {name} ({champ:.4f} {where}) by no more than "
                f"chance: {proof.describe()} (promotion.significance {rules.significance})"
            )
    for table, unit in (("per_class", "class"), ("per_type", "entity type")):
        ours = evaluation.finetuned.get(table) or {}
        theirs = (champ_metrics or {}).get(table) or {}
        drops = [
            (theirs[lab]["f1"] - ours.get(lab, {}).get("f1", 0.0), lab)
            for lab in theirs
            if theirs[lab].get("support", 1)
        ]
        if drops and max(drops)[0] > rules.max_class_regression:
            drop, lab = max(drops)
            return False, (
                f"{unit} {lab!r} F1 falls from {theirs[lab]['f1']:.4f} (champion {name}) to "
                f"{ours.get(lab, {}).get('f1', 0.0):.4f}, more than "
                f"promotion.max_class_regression {rules.max_class_regression}"
            )
    why = f"{m} {new:.4f} beats champion {name} ({champ:.4f} {where})"
    if proof is not None and rules.significance is not None:
        why += f"; {proof.describe()}"
    elif evidence is not None and evidence.note and rules.significance is not None:
        why += f" ({evidence.note})"
    return True, why
