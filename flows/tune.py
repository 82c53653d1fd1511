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
from prefect.states import Completed

from domaintune.chaining import pin
from domaintune.config import RetrainConfig
from domaintune.flows.retrain import (
    evaluate_task,
    finetune_task,
    monitor_task,
    prepare,
    register_prepared,
    run_summary,
    skipped,
)
from domaintune.orchestration import call_stage, should_retry
from domaintune.redaction import redact, redact_obj
from domaintune.reporting.tracking import finish_run
from domaintune.runconfig import complete
from domaintune.storage.manifests import StageRecord
from domaintune.storage.store import Store
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
    config = complete(config)  # the task type's rules and defaults (the schema knows none)
    config = pin(config)  # a registry://NAME@production base is one version for the search
    check_space(config)
    wanted = trials or config.tune.trials
    records: list[StageRecord] = []
    # ingest, validate, preprocess (a recipe: its earlier stages trained, once); the trials
    # search the last stage's settings
    run = prepare(config, records)
    # the champion on newly landed files, drift: retrain.when decides for a search as well
    health = call_stage(monitor_task, records, run.config, run.raw, run.splits)
    if not health.train:
        return skipped(config, run, records, health, t0)
    run.health = health
    store = Store.of(config)
    with Tuner.open(run.config, run.splits, store) as tuner:
        logger.info(
            "tune: study %s: %d of %d trial(s) finished", tuner.key, tuner.finished(), wanted
        )
        while (trial := tuner.ask(wanted)) is not None:
            state = trial_task.with_options(
                task_run_name=f"trial-{trial.number}",
                retries=config.retries.count,
                retry_delay_seconds=config.retries.delay_seconds,
            )(tuner, trial, return_state=True)
            result = state.result(raise_on_failure=False)
            if not state.is_completed() and not isinstance(result, BaseException):
                result = RuntimeError(f"trial {trial.number} ended in state {state.name}")
            tuner.tell(trial, result)
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
    model = call_stage(finetune_task, records, best_config, run.splits)
    evaluation = call_stage(evaluate_task, records, best_config, run.splits, model)
    registration = register_prepared(run, records, config, model, evaluation, best_config)
    summary_of_run = run_summary(config, run, records, model, evaluation, registration, t0, health)
    finish_run(best_config, summary_of_run, model, registration)  # tracking.report_to: MLflow
    values = decode(best.params, config.tune.space)
    summary = {
        **summary_of_run.model_dump(mode="json"),
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
