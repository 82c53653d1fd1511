"""Prefect wrappers around the plain stage functions.

A stage task adds what only orchestration needs: retries (never for bad input), a Prefect
state of ``Cached`` whenever the stage's output came from the store (so the UI shows Cached
for exactly the stages that were skipped), logging into the run, and UI artifacts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from domaintune.errors import DomainTuneError
from domaintune.storage.manifests import Manifest, StageRecord


class _OneLineForBadInput(logging.Filter):
    """Bad input fails a run with one line that names the file, row or field and the rule:
    Prefect's engine logs that exception with its Python traceback, which reads as a crash.
    The message stays; the traceback goes (other exceptions keep theirs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DomainTuneError):
            record.exc_info = record.exc_text = None
        return True


def one_line_for_bad_input() -> None:
    """Install the filter on the loggers of Prefect's flow and task engines (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineForBadInput) for f in logger.filters):
            logger.addFilter(_OneLineForBadInput())


one_line_for_bad_input()  # every flow module imports this one, in the CLI and in workers


def should_retry(task: Task, task_run: Any, state: Any) -> bool:
    """Retry machine faults; never bad input (it would fail the same way again)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the state carries no readable exception: retry to be safe
        return True
    return not (isinstance(exc, BaseException) and isinstance(exc, DomainTuneError))


def stage_task(
    fn: Callable[..., Manifest], name: str, after: Callable[[Manifest], None] | None = None
) -> Task:
    """Wrap ``fn(config, *manifests, store)`` as a Prefect task named ``name``."""

    def run(config: Any, *inputs: Any, **kwargs: Any) -> Any:
        from domaintune.storage.store import Store

        try:
            manifest = fn(config, *inputs, store=Store.of(config), **kwargs)
        except DomainTuneError as exc:
            report = getattr(exc, "report_path", None)
            if report and os.path.isfile(report):
                from prefect.artifacts import create_markdown_artifact

                with open(report) as f:
                    create_markdown_artifact(f.read(), description=f"{name} failed")
            raise
        if after is not None:
            after(manifest)
        if manifest.reused:
            return Completed(
                name="Cached",
                data=manifest,
                message=f"reused store entry {manifest.stage}/{manifest.key}",
            )
        return manifest

    run.__name__ = name
    run.__doc__ = fn.__doc__
    return task(
        run,
        name=name,
        task_run_name=name,
        cache_policy=NO_CACHE,
        persist_result=False,
        retry_condition_fn=should_retry,
    )


def call_stage(
    t: Task, records: list[StageRecord], config: Any, *inputs: Any, **kwargs: Any
) -> Any:
    """Run a stage task with the config's retry settings and record how it went."""
    t0 = time.perf_counter()
    state = t.with_options(
        retries=config.retries.count, retry_delay_seconds=config.retries.delay_seconds
    )(config, *inputs, return_state=True, **kwargs)
    seconds = round(time.perf_counter() - t0, 3)
    if not state.is_completed():
        records.append(StageRecord(name=t.name, cached=False, seconds=seconds))
        _keep_failed_run_stages(records)
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, BaseException):
            raise exc
        raise RuntimeError(f"stage {t.name} ended in state {state.name}")
    manifest = state.result()
    records.append(
        StageRecord(name=t.name, cached=state.name == "Cached", seconds=seconds, key=manifest.key)
    )
    return manifest


#: flow run id -> the stages of that failed run, up to the one that failed (the last few runs
#: of this process: whoever started the run reads them with failed_run_stages)
_FAILED_RUN_STAGES: OrderedDict[str, list[StageRecord]] = OrderedDict()
_FAILED_RUN_STAGES_LOCK = threading.Lock()


def _keep_failed_run_stages(records: list[StageRecord]) -> None:
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return
    with _FAILED_RUN_STAGES_LOCK:
        _FAILED_RUN_STAGES[str(run_id)] = list(records)
        while len(_FAILED_RUN_STAGES) > 64:
            _FAILED_RUN_STAGES.popitem(last=False)


def failed_run_stages(flow_run_id: str | None) -> list[StageRecord]:
    """The stages a failed flow run of this process went through, the failed one last (what
    the CLI prints beside the error); empty when none is known."""
    with _FAILED_RUN_STAGES_LOCK:
        return _FAILED_RUN_STAGES.pop(str(flow_run_id), []) if flow_run_id else []


def superseded_by() -> str | None:
    """The id of a newer run of this flow run's deployment, with the same parameters, that
    is waiting to start (queued behind the deployment's concurrency limit, or due now); None
    when there is none or this run was not started from a deployment.

    Such a run will train on the same landed files and any that arrived since, so this one
    has nothing to add: a burst of data-arrival events costs at most two retrains (the one
    running when the burst began, and the newest queued run)."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    with get_client(sync_client=True) as client:
        me = client.read_flow_run(flow_run.id)
        deployment_id = me.deployment_id
        if deployment_id is None:
            return None
        waiting = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])
                )
            ),
            limit=200,
        )
    due = datetime.now(UTC) + timedelta(seconds=30)  # not next week's scheduled run
    newer = [
        r
        for r in waiting
        if r.id != me.id
        and r.created is not None
        and me.created is not None
        and r.created > me.created
        and r.parameters == me.parameters
        and (r.expected_start_time is None or r.expected_start_time <= due)
    ]
    return str(max(newer, key=lambda r: r.created).id) if newer else None


def own_temporary_server() -> None:
    """Start Prefect's temporary local server now, in a process group of its own, when no
    ``PREFECT_API_URL`` names a server (what the first flow call would otherwise do, in the
    command's own group).

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the server died
    with the command, before the command could mark its run Crashed and stop its training,
    and the command then retried every call to the dead API for minutes. In a group of its
    own the server lives until Prefect's atexit handler stops it, after the run's final state
    is written."""
    import subprocess

    from prefect.server.api import server as server_module
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    server = server_module.SubprocessASGIServer()  # the instance every Prefect client uses
    if server.running:
        return

    class _OwnGroup(subprocess.Popen):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    popen = server_module.subprocess.Popen
    # process-wide for the seconds of this start: the command has started no other thread
    # that starts processes yet
    server_module.subprocess.Popen = _OwnGroup
    try:
        server.start()
    finally:
        server_module.subprocess.Popen = popen
