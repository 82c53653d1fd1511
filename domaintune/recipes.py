"""Multi-stage recipes: stages that run in order inside one ``retrain`` run.

    name: finance-sentiment
    task: {type: text_classification}
    data: {source: data/news.csv, text_column: news, label_column: label}
    training: {epochs: 4, learning_rate: 1.0e-4}
    stages:
      - name: dapt                      # domain-adaptive pre-training on the same text
        task: {type: masked_lm}
        training: {epochs: 3}
      - name: classify                  # the config above as it is
      - name: attention
        data: {source: data/more-news.csv}
        training: {strategy: {kind: components, components: [attention]}}

Each stage is the config above with the stage's own sections merged on (mappings merge key
by key; a value or a list replaces; a stage that names ``data.source`` or ``data.splits``
replaces both). It is a complete config, validated as one: an error names the stage. A stage
that changes ``task.type`` without naming ``evaluation.primary_metric`` (or ``task.labels``)
gets the task type's default metric (and the labels its own data has).

The first stage starts from ``model.name_or_path``; every later one from the model the stage
before it trained (its finetune store entry, ``store://finetune/<key>``: the entry's content
fingerprint is that stage's base fingerprint, so a change to stage 2 reuses stage 1, and a
change to stage 1 retrains everything after it). A head that does not fit the next stage
(another task, another label set) is replaced by a fresh seeded head
(``domaintune.training.strategies.head_change``), as for a registered parent.

Every stage is ingested, validated, preprocessed, trained and evaluated like a one-stage run,
with its own cache entries; only the last stage is registered and promoted, under the
config's ``name`` (earlier stages evaluate as ``NAME.STAGE``: no registry, no champion), and
the registered version's lineage lists the chain. No stage trains on the text the final
model is validated or tested on: the final stage's validation and test texts are left out of
every earlier stage's data (what matters when a pre-training stage reads the labelled file's
own text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from domaintune.config import RetrainConfig, format_validation_error
from domaintune.tasktypes.rules import apply_task_rules

#: Sections a stage may not set: one run has one name, one store, one recipe.
_NOT_PER_STAGE = ("store", "stages", "tune")
_STAGE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
#: How a later stage names the model the stage before it trained.
FROM_STAGE = "store://finetune/"


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its name (None for a one-stage config) and its complete config."""

    name: str | None
    config: Any  # RetrainConfig
    index: int = 0
    final: bool = True

    def label(self, stage_name: str) -> str:
        """A pipeline stage's name in this recipe stage: ``dapt-finetune``; the last stage's
        (and a one-stage run's) are the plain names."""
        return stage_name if self.final or self.name is None else f"{self.name}-{stage_name}"


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return override


def _stage_dict(base: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    stage = {k: v for k, v in stage.items() if k != "name"}
    merged = dict(base)
    data = stage.get("data")
    if isinstance(data, dict) and ("source" in data or "splits" in data):
        merged["data"] = {
            k: v for k, v in base.get("data", {}).items() if k not in ("source", "splits")
        }
    merged = _merge(merged, stage)
    task = stage.get("task") or {}
    if "type" in task and task["type"] != base.get("task", {}).get("type"):
        # another task type: its own default metric and the labels of its own data
        if "primary_metric" not in (stage.get("evaluation") or {}):
            merged["evaluation"] = {**merged.get("evaluation", {}), "primary_metric": None}
        if "labels" not in task:
            merged["task"] = {k: v for k, v in merged["task"].items() if k != "labels"}
    return merged


def stage_configs(config: Any) -> list[Stage]:
    """The stages of a run, in order; a config without ``stages`` is one stage. A stage that
    is not a valid config raises ValueError naming the stage and the key."""
    if not config.stages:
        return [Stage(name=None, config=config)]
    base = config.model_dump(mode="python", exclude={"stages"})
    out: list[Stage] = []
    n = len(config.stages)
    for i, stage in enumerate(config.stages):
        name = stage["name"]
        final = i == n - 1
        data = _stage_dict(base, stage)
        if not final:
            data["name"] = f"{config.name}.{name}"
            # every stage's training in the recipe's experiment
            data["tracking"] = {
                **data.get("tracking", {}),
                "experiment": config.tracking.experiment or config.name,
            }
        try:
            staged = RetrainConfig.model_validate(data)
            apply_task_rules(staged)
        except ValidationError as exc:
            said = format_validation_error(exc, "").splitlines()[1:]
            raise ValueError(
                f"stages[{i}] ({name}): {'; '.join(s.strip() for s in said)}"
            ) from None
        except ValueError as exc:  # a task type's rule
            raise ValueError(f"stages[{i}] ({name}): {exc}") from None
        out.append(Stage(name=name, config=staged, index=i, final=final))
    return out


def check_stages(config: Any) -> None:
    """Raise ValueError (one line, naming the stage and the key) for a recipe that cannot
    run."""
    stages = config.stages
    if not stages:
        raise ValueError("stages: an empty list; rule: leave stages out for a one-stage run")
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise ValueError(f"{where}: a stage is a mapping with a name and config sections")
        name = stage.get("name")
        if not isinstance(name, str) or not re.match(_STAGE_NAME, name):
            raise ValueError(f"{where}.name: required, letters, digits, _ and - (got {name!r})")
        if name in seen:
            raise ValueError(f"{where}.name: {name!r} is used twice; rule: stage names are unique")
        seen.add(name)
        where = f"{where} ({name})"
        for key in _NOT_PER_STAGE:
            if key in stage:
                raise ValueError(f"{where}.{key}: set once for the whole recipe, not per stage")
        model = stage.get("model") or {}
        if i > 0 and isinstance(model, dict):
            for key in ("name_or_path", "revision"):
                if key in model:
                    raise ValueError(
                        f"{where}.model.{key}: a later stage starts from the model the stage "
                        "before it trained; rule: only the first stage names a base model"
                    )
    stage_configs(config)  # each stage a complete, valid config


def from_previous(stage: Stage, previous_model_key: str) -> Any:
    """``stage``'s config starting from the model the stage before it trained."""
    config = stage.config
    model = config.model.model_copy(
        update={"name_or_path": f"{FROM_STAGE}{previous_model_key}", "revision": None}
    )
    return config.model_copy(update={"model": model})


def stage_record(stage: Stage, config: Any, raw: Any, splits: Any, model: Any, evaluation: Any):
    """What the registered version's lineage says about an earlier stage."""
    return {
        "stage": stage.name,
        "task": config.task.type,
        "base_model": {"name": model.base_model, "fingerprint": model.base_fingerprint},
        "raw_snapshot": {"key": raw.key, "fingerprint": raw.fingerprint, "rows": raw.rows},
        "splits": {"key": splits.key, "fingerprint": splits.fingerprint},
        "held_out_of_final_stage": int(splits.stats.get("held_out_of_final_stage", 0)),
        "model": {
            "key": model.key,
            "fingerprint": model.fingerprint,
            "global_step": model.global_step,
            "strategy": model.strategy.strategy,
        },
        "evaluation": {
            "key": evaluation.key,
            "primary_metric": evaluation.primary_metric,
            "base": evaluation.base.get(evaluation.primary_metric),
            "finetuned": evaluation.finetuned.get(evaluation.primary_metric),
        },
    }
