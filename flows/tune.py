"""The ``tune`` flow: a hyperparameter search with Optuna, then the best model tested and
registered.

Wiring only (the search is ``domaintune.tuning``): ingest -> validate -> preprocess once,
with the retrain flow's stage tasks and store entries; then one task per trial
(``trial-<n>``: the finetune stage on the trial's settings, judged on the validation split,
pruned when hopeless); then the best trial's finetune entry (Cached), a single test
evaluation and registration, with the usual promotion rules. Running it again continues
the same study in the store.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

from domaintune.chaining import pin
from domaintune.config import RetrainConfig
from domaintune.flows.retrain import (
    evaluate_task,
    finetune_task,
    ingest_task,
    preprocess_task,
    register_task,
    validate_task,
)
from domaintune.manifests import RunSummary, StageRecord
from domaintune.orchestration import call_stage, should_retry
from domaintune.redaction import redact, redact_obj
from domaintune.store import Store
from domaintune.tasks.finetune import training_summary
from domaintune.tracking import finish_run
from domaintune.tuning import TrialRun, Tuner, check_space, decode, set_options, state_counts


def _trial(tuner: Tuner, run: TrialRun) -> Any:
    """One trial: the finetune stage on its settings (Cached when trained before)."""
    outcome = tuner.train(run)
    if outcome.state == "pruned":
        return Completed(name="Pruned", data=outcome, message=outcome.message)
    if outcome.cached:
        return Completed(
            name="Cached", data=outcome, message=f"reused store entry finetune/{outcome.key}"
        )
    return outcome


trial_task = task(
    _trial,
    name="trial",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=should_retry,
)


@flow(name="tune", flow_run_name="tune-{config.name}", log_prints=False)
def tune(config: RetrainConfig, trials: int | None = None) -> dict[str, Any]:
    """Search the training settings of ``config.tune.space`` (``trials``: how many trials
    to finish, default ``tune.trials``), then test and register the best model."""
    t0 = time.perf_counter()
    logger = get_run_logger()
    config = pin(config)  # a registry://NAME@production base is one version for the search
    check_space(config)
    wanted = trials or config.tune.trials
    stages: list[StageRecord] = []
    raw = call_stage(ingest_task, stages, config)
    validation = call_stage(validate_task, stages, config, raw)
    splits = call_stage(preprocess_task, stages, config, raw, validation=validation)
    store = Store.of(config)
    with Tuner.open(config, splits, store) as tuner:
        logger.info(
            "tune: study %s: %d of %d trial(s) finished", tuner.key, tuner.finished(), wanted
        )
        while (run := tuner.ask(wanted)) is not None:
            state = trial_task.with_options(
                task_run_name=f"trial-{run.number}",
                retries=config.retries.count,
                retry_delay_seconds=config.retries.delay_seconds,
            )(tuner, run, return_state=True)
            result = state.result(raise_on_failure=False)
            if not state.is_completed() and not isinstance(result, BaseException):
                result = RuntimeError(f"trial {run.number} ended in state {state.name}")
            tuner.tell(run, result)
        rows = tuner.rows()
        importances, _ = tuner.importances()
        create_table_artifact(
            redact_obj(rows), description=f"Hyperparameter search: {len(rows)} trial(s)"
        )
        create_markdown_artifact(
            redact(tuner.report_markdown()), description="Hyperparameter search: importances"
        )
        best = tuner.best()
        best_config = tuner.best_config()
    # the best trial's training (a Cached finetune entry), tested once, registered
    model = call_stage(finetune_task, stages, best_config, splits)
    evaluation = call_stage(evaluate_task, stages, best_config, splits, model)
    registration = call_stage(
        register_task,
        stages,
        best_config,
        raw,
        splits,
        model,
        evaluation,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    run_summary = RunSummary(
        run_id=str(flow_run.id) if flow_run.id else None,
        name=config.name,
        domain=config.domain,
        status="completed",
        stages=stages,
        metrics={
            "primary_metric": evaluation.primary_metric,
            "test_rows": evaluation.test_rows,
            "finetuned": {
                k: v for k, v in evaluation.finetuned.items() if isinstance(v, int | float)
            },
            "base": {k: v for k, v in evaluation.base.items() if isinstance(v, int | float)},
            "report": evaluation.report_markdown,
        },
        model_dir=registration.model_dir,
        version=registration.version,
        promoted=registration.promoted,
        promotion_reason=registration.promotion_reason,
        validation_report=validation.report_markdown,
        quarantined_rows=validation.quarantined_rows,
        quarantine_table=validation.quarantine_table,
        training=training_summary(model),
        trust_remote_code=config.model.trust_remote_code,
        seconds=round(time.perf_counter() - t0, 3),
    )
    finish_run(best_config, run_summary, model, registration)  # tracking.report_to: the MLflow run
    values = decode(best.params, config.tune.space)
    summary = {
        **run_summary.model_dump(mode="json"),
        "flow": "tune",
        "study": {
            "key": tuner.key,
            "path": store.url_of("tune", config.name, tuner.key),
            "trials": wanted,
            "metric": tuner.metric,
            "direction": "maximize" if tuner.greater else "minimize",
            "sampler": config.tune.sampler,
            "pruner": config.tune.pruner,
            "counts": state_counts(rows),
            "recovered": tuner.recovered,
            "importances": importances,
        },
        "best": {
            "trial": best.number,
            "value": best.value,
            "params": values,
            "set": set_options(values),
        },
        "trials": rows,
    }
    summary = redact_obj(summary)
    tuner.save_summary(summary)
    return summary
