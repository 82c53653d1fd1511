"""The promotion gate: whether a registered candidate becomes the production version.

Beside the registry (domaintune.registry), which records the decision; the register stage
(tasks/register.py) asks, the CLI's ``models promote`` overrides it by hand.
"""

from __future__ import annotations

from typing import Any

from domaintune.config import RetrainConfig
from domaintune.storage.manifests import EvaluationReport
from domaintune.tasktypes import get_task_type


def decide_promotion(
    config: RetrainConfig, evaluation: EvaluationReport, champion: dict[str, Any] | None
) -> tuple[bool, str]:
    """(promote?, why). In order: beat the base model by ``min_gain_over_base``; clear the
    absolute ``min_primary_metric`` (a ceiling for perplexity); beat the champion, re-scored
    on this run's test split, by ``margin_over_champion``; and no class or entity type F1
    below the champion's by more than ``max_class_regression``."""
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
    return True, f"{m} {new:.4f} beats champion {name} ({champ:.4f} {where})"
