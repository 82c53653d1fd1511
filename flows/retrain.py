"""The ``retrain`` flow: ingest -> validate -> preprocess -> monitor -> finetune -> evaluate ->
register.

Wiring only: every decision is in a stage (``domaintune.tasks``). A stage whose output is
already in the store finishes as Cached; a broken data contract stops the flow before
training; ``monitor`` scores the champion on newly landed files, measures drift and, by
``retrain.when``, ends the run Completed as "Skipped" (with its figures) before training;
only a completed run reaches ``register``, so a failed run never promotes a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed

from domaintune.chaining import pin
from domaintune.config import RetrainConfig
from domaintune.orchestration import call_stage, stage_task, superseded_by
from domaintune.recipes import Stage, from_previous, stage_configs, stage_record
from domaintune.redaction import redact, redact_obj
from domaintune.reporting.reports import metric_rows, training_markdown
from domaintune.reporting.tracking import finish_run
from domaintune.runconfig import complete
from domaintune.storage.manifests import (
    EvaluationReport,
    HealthReport,
    ModelArtifact,
    Registration,
    RunSummary,
    StageRecord,
    ValidationReport,
    scalar_metrics,
)
from domaintune.tasks.evaluate import evaluate
from domaintune.tasks.export import export
from domaintune.tasks.finetune import finetune, run_summary_training
from domaintune.tasks.ingest import ingest
from domaintune.tasks.monitor import monitor
from domaintune.tasks.preprocess import HeldOut, TrainSelection, preprocess
from domaintune.tasks.register import register
from domaintune.tasks.validate import validate


def _publish_validation(report: ValidationReport) -> None:
    with open(report.report_markdown) as f:
        create_markdown_artifact(redact(f.read()), description="Data contract validation")


def _publish_evaluation(report: EvaluationReport) -> None:
    import json

    with open(report.metrics_json) as f:
        doc = json.load(f)
    create_table_artifact(
        redact_obj(metric_rows(doc)),
        description=f"Test metrics: base vs fine-tuned ({report.test_rows} rows)",
    )
    with open(report.report_markdown) as f:
        create_markdown_artifact(redact(f.read()), description="Evaluation report")


def _publish_health(report: HealthReport) -> None:
    import json
    from pathlib import Path

    if report.report_markdown is None:
        return
    with open(report.report_markdown) as f:
        create_markdown_artifact(redact(f.read()), description="Champion health on new data")
    history = Path(report.path) / "history.json"
    if history.is_file():
        create_table_artifact(
            redact_obj(json.loads(history.read_text())), description="Champion health history"
        )


def _publish_training(model: ModelArtifact) -> None:
    create_markdown_artifact(
        redact(training_markdown(model)),
        description="Fine-tuning: strategy and trainable parameters",
    )


ingest_task = stage_task(ingest, "ingest")
validate_task = stage_task(validate, "validate", after=_publish_validation)
preprocess_task = stage_task(preprocess, "preprocess")
monitor_task = stage_task(monitor, "monitor", after=_publish_health)
finetune_task = stage_task(finetune, "finetune", after=_publish_training)
evaluate_task = stage_task(evaluate, "evaluate", after=_publish_evaluation)
export_task = stage_task(export, "export")
register_task = stage_task(register, "register")


@dataclass
class Prepared:
    """A run's stages up to the last one's training: the last stage's config (starting from
    the model the stage before it trained), data and splits, and the earlier stages
    (``domaintune.recipes.stage_record``)."""

    config: RetrainConfig
    raw: Any
    validation: ValidationReport
    splits: Any
    chain: list[dict[str, Any]] = field(default_factory=list)
    #: the monitor stage's report (the champion on the new files, drift), once it ran
    health: HealthReport | None = None


def prepare(config: RetrainConfig, records: list[StageRecord]) -> Prepared:
    """Ingest and check every stage's data (before anything trains), train and evaluate the
    earlier stages of a multi-stage recipe, and preprocess the last stage's data; for a
    one-stage config: ingest, validate, preprocess."""
    recipe = stage_configs(config)

    def named(t: Any, stage: Stage) -> Any:  # "dapt-finetune" for an earlier stage
        return t.with_options(name=stage.label(t.name))

    data = []
    for stage in recipe:
        raw = call_stage(named(ingest_task, stage), records, stage.config)
        validation = call_stage(named(validate_task, stage), records, stage.config, raw)
        data.append((raw, validation))
    # no earlier stage trains on the text the final model is validated or tested on
    held_out = HeldOut(recipe[-1].config, *data[-1]) if len(recipe) > 1 else None
    chain: list[dict[str, Any]] = []
    model = None
    for stage, (raw, validation) in zip(recipe, data, strict=True):
        cfg = stage.config if model is None else from_previous(stage, model.key)
        splits = call_stage(
            named(preprocess_task, stage),
            records,
            cfg,
            raw,
            validation=validation,
            **({} if stage.final else {"held_out": held_out}),
        )
        if stage.final:
            return Prepared(cfg, raw, validation, splits, chain)
        model = call_stage(named(finetune_task, stage), records, cfg, splits)
        evaluation = call_stage(named(evaluate_task, stage), records, cfg, splits, model)
        chain.append(stage_record(stage, cfg, raw, splits, model, evaluation))
    raise AssertionError("a recipe ends with its final stage")


def register_prepared(
    run: Prepared,
    records: list[StageRecord],
    recipe: RetrainConfig,
    model: ModelArtifact,
    evaluation: EvaluationReport,
    config: RetrainConfig | None = None,
) -> Registration:
    """The export stage for each of ``export.formats``, then the register stage for a
    prepared run (``config``: the last stage's settings, if they differ from
    ``run.config``, as the best trial's of a search)."""
    cfg = config or run.config
    exports = [
        call_stage(
            export_task.with_options(name=f"export-{fmt}"), records, cfg, run.splits, model, fmt=fmt
        )
        for fmt in cfg.export.formats
    ]
    return call_stage(
        register_task,
        records,
        config or run.config,
        run.raw,
        run.splits,
        model,
        evaluation,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        **({"recipe": recipe, "chain": run.chain} if run.chain else {}),
        **({"health": run.health} if run.health is not None and run.health.version else {}),
        **({"exports": exports} if exports else {}),
    )


def run_summary(
    config: RetrainConfig,
    run: Prepared,
    records: list[StageRecord],
    model: ModelArtifact,
    evaluation: EvaluationReport,
    registration: Registration,
    t0: float,
    health: HealthReport | None = None,
) -> RunSummary:
    return RunSummary(
        run_id=str(flow_run.id) if flow_run.id else None,
        name=config.name,
        domain=config.domain,
        status="completed",
        stages=records,
        metrics={
            "primary_metric": evaluation.primary_metric,
            "test_rows": evaluation.test_rows,
            "finetuned": scalar_metrics(evaluation.finetuned),
            "base": scalar_metrics(evaluation.base),
            "report": evaluation.report_markdown,
            # the champion on the newly landed files and their drift (the monitor stage)
            **(
                {"health": health.model_dump(mode="json", exclude={"drift"})}
                if health is not None and health.version
                else {}
            ),
        },
        model_dir=registration.model_dir,
        version=registration.version,
        promoted=registration.promoted,
        promotion_reason=registration.promotion_reason,
        validation_report=run.validation.report_markdown,
        quarantined_rows=run.validation.quarantined_rows,
        quarantine_table=run.validation.quarantine_table,
        training=run_summary_training(model),
        trust_remote_code=config.model.trust_remote_code,
        recipe=run.chain,
        seconds=round(time.perf_counter() - t0, 3),
    )


def skipped(
    config: RetrainConfig,
    run: Prepared,
    records: list[StageRecord],
    health: HealthReport,
    t0: float,
) -> Any:
    """The run's end when ``retrain.when`` says not to train: Completed, named Skipped,
    with the figures in its message and the summary as its result."""
    summary = RunSummary(
        run_id=str(flow_run.id) if flow_run.id else None,
        name=config.name,
        domain=config.domain,
        status="skipped",
        stages=records,
        metrics={"health": health.model_dump(mode="json", exclude={"drift"})},
        version=health.version,
        promoted=False,
        promotion_reason=health.message,
        validation_report=run.validation.report_markdown,
        quarantined_rows=run.validation.quarantined_rows,
        quarantine_table=run.validation.quarantine_table,
        seconds=round(time.perf_counter() - t0, 3),
    )
    get_run_logger().info("retrain: %s", health.message)
    return Completed(
        name="Skipped",
        message=redact(health.message),
        data=redact_obj(summary.model_dump(mode="json")),
    )


def from_champion(run: Prepared, records: list[StageRecord], health: HealthReport) -> Prepared:
    """``retrain.start_from: champion``: the last stage continues from the production
    version (pinned), on the new files' training rows plus a replay sample of earlier ones
    (``retrain.replay_share``); validation and test stay whole, so evaluation sees the
    champion's own test rows and the new ones (the forgetting guard compares both)."""
    cfg = run.config
    reference = f"registry://{cfg.name}@{health.version}"
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": reference})})
    cfg = pin(cfg)
    selection = TrainSelection(
        new_sources=tuple(health.new_files),
        replay_share=cfg.retrain.replay_share,
        seed=cfg.evaluation.split_seed,
    )
    splits = call_stage(
        preprocess_task.with_options(name="preprocess-continual"),
        records,
        cfg,
        run.raw,
        validation=run.validation,
        selection=selection,
    )
    return Prepared(cfg, run.raw, run.validation, splits, run.chain, health)


@flow(name="retrain", flow_run_name="retrain-{config.name}", log_prints=False)
def retrain(config: RetrainConfig) -> dict[str, Any]:
    """Retrain one use case's model from its data and promote it if it is better."""
    t0 = time.perf_counter()
    config = complete(config)  # the task type's rules and defaults (the schema knows none)
    newer = superseded_by()
    if newer:  # a newer queued run of this deployment will do the same, with newer data
        message = (
            f"superseded by flow run {newer} of this deployment, queued with the same "
            "parameters: it trains on the same landed files and any that arrived since"
        )
        get_run_logger().info(message)
        return Completed(name="Superseded", message=message)
    # a registry://NAME@production base is one version for the whole run
    config = pin(config)
    records: list[StageRecord] = []
    # one stage, or a multi-stage recipe's stages up to the last one (domaintune.recipes)
    run = prepare(config, records)
    health = call_stage(monitor_task, records, run.config, run.raw, run.splits)
    if not health.train:  # retrain.when: the champion holds and nothing drifted
        return skipped(config, run, records, health, t0)
    run.health = health
    if config.retrain.start_from == "champion" and health.version and health.new_files:
        run = from_champion(run, records, health)
    model = call_stage(finetune_task, records, run.config, run.splits)
    evaluation = call_stage(evaluate_task, records, run.config, run.splits, model)
    registration = register_prepared(run, records, config, model, evaluation)
    summary = run_summary(config, run, records, model, evaluation, registration, t0, health)
    finish_run(config, summary, model, registration)  # tracking.report_to: the MLflow run
    return redact_obj(summary.model_dump(mode="json"))
