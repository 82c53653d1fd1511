"""The ``score`` flow: new files scored with the production model, one cached entry per file.

Wiring only (the stage is ``domaintune.tasks.score``): pin the model reference to one
version, score every file of the source (a file already scored by that version is Cached),
and publish what was scored, by which version, with the counts per predicted class.
Deployments in ``deployments/prefect.yaml`` run it per domain on a schedule and when files
land in ``landing/<domain>-incoming/``.
"""

from __future__ import annotations

import time
from pathlib import PurePosixPath
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from domaintune.orchestration import call_stage, stage_task
from domaintune.redaction import redact, redact_obj
from domaintune.reporting.reports import counts_markdown, total_counts
from domaintune.storage.manifests import StageRecord
from domaintune.storage.store import Store
from domaintune.tasks.score import ScoreConfig, pin_model, score_file

score_task = stage_task(score_file, "score")


@flow(name="score", flow_run_name="score-{config.name}", log_prints=False)
def score(config: ScoreConfig) -> dict[str, Any]:
    """Score new files with a registered model (production by default) into the store."""
    t0 = time.perf_counter()
    logger = get_run_logger()
    from domaintune.readers.sources import resolve_sources

    store = Store.of(config)
    model, fingerprint = pin_model(config, store)
    files = resolve_sources(config.source, "source", config.storage_options, allow_empty=True)
    if not files:
        logger.info("score: %s matched no files yet: nothing to score", redact(str(config.source)))
    stages: list[StageRecord] = []
    scored = []
    for f in files:
        name = PurePosixPath(f.path).name
        task = score_task.with_options(task_run_name=f"score {name}")
        scored.append(
            call_stage(task, stages, config, f.url, model=model, model_fingerprint=fingerprint)
        )
    table = [
        {
            "file": s.source,
            "rows": s.rows,
            "version": s.version or s.model,
            "cached": record.cached,
            "counts": ", ".join(f"{k} {v}" for k, v in s.counts.items()),
            "predictions": s.predictions,
        }
        for s, record in zip(scored, stages, strict=True)
    ]
    if table:
        create_table_artifact(
            redact_obj(table),
            description=f"Files scored by {model} and where their predictions are",
        )
    create_markdown_artifact(
        redact(counts_markdown(config.name, model, scored)), description=f"Scoring {config.name}"
    )
    return redact_obj(
        {
            "name": config.name,
            "model": model,
            "model_fingerprint": fingerprint,
            "files": table,
            "rows": sum(s.rows for s in scored),
            "counts": total_counts(scored),
            "scored": sum(not r.cached for r in stages),
            "cached": sum(r.cached for r in stages),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )
