"""Experiment tracking (``tracking.report_to``): TensorBoard event files and MLflow runs.

What is tracked, and from where:

- Per-step training and validation metrics: rank 0 prints them as progress events
  (``DOMAINTUNE {json}`` lines) that the finetune task reads from the launcher's output
  anyway. ``TrainingTracker`` writes each one as it arrives to TensorBoard event files (in the
  training's working folder while it runs, then in the finetune entry's ``tensorboard/``) and
  to the training's MLflow run. The ranks never talk to MLflow: they get no secret (the launch
  removes secret-named variables such as ``MLFLOW_TRACKING_PASSWORD``), and metrics go to the
  server from a background thread, so a slow server never holds up the ranks' output.
- Parameters: the config, flattened to ``section.key`` and redacted, without this section.
- Final test metrics of the fine-tuned and the base model, the registry version and the
  promotion: ``finish_run`` at the end of the flow, into the same MLflow run. A flow whose
  finetune stage was cached (nothing trained) gets an MLflow run of its own, tagged
  ``domaintune.cached``, that names the entry and the run that trained it.
- ``tracking.register_promotions``: a promoted version also becomes a version of the MLflow
  registered model named like the use case, with the alias ``champion``.

No stage's cache key reads this section: tracking changes what is reported, never what is
computed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import ConfigError
from domaintune.redaction import redact
from domaintune.storage.manifests import scalar_metrics

if TYPE_CHECKING:
    from domaintune.config import RetrainConfig
    from domaintune.storage.manifests import ModelArtifact, Registration, RunSummary

log = logging.getLogger(__name__)

#: The event files' folder in a training's working folder and in the finetune entry (not part
#: of the model: register leaves it out of the registered model folder).
TENSORBOARD_DIR = "tensorboard"
#: Prefix of domaintune's MLflow tags.
TAG = "domaintune."
#: The MLflow registered model's alias of the production version.
CHAMPION_ALIAS = "champion"
#: Fields of a progress event that are not metrics.
_NOT_METRICS = frozenset({"step", "max_steps", "elapsed"})
#: How long the end of a training waits for metrics still on their way to MLflow.
_SEND_TIMEOUT_S = 60.0
_MAX_PARAM_CHARS = 6000  # MLflow's limit of a parameter value
_MAX_TAG_CHARS = 8000


# ------------------------------------------------------------------------------ what is logged


def metric_name(key: str) -> str:
    """A metric's tracked name, as transformers' own TensorBoard callback writes it:
    ``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def step_metrics(event: dict[str, Any]) -> dict[str, float]:
    """The metrics of one ``log`` progress event of rank 0, by tracked name."""
    return {
        metric_name(k): float(v) for k, v in scalar_metrics(event).items() if k not in _NOT_METRICS
    }


def run_params(config: RetrainConfig) -> dict[str, str]:
    """The config as flat ``section.key`` parameters (lists and mappings as JSON, every value
    redacted), without the tracking section."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[re.sub(r"[^\w./ -]", "_", prefix)] = redact(text)[:_MAX_PARAM_CHARS]

    walk("", config.model_dump(mode="json", exclude={"tracking"}))
    return out


def _params_markdown(config: RetrainConfig) -> str:
    rows = "".join(f"| {k} | {v.replace('|', '/')} |\n" for k, v in run_params(config).items())
    return "| parameter | value |\n|---|---|\n" + rows


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {text[0] if text else ''}")[:400]


# ------------------------------------------------------------------------------------ MLflow


def _client(config: RetrainConfig) -> tuple[Any, str]:
    """An ``MlflowClient`` for ``tracking.mlflow_uri`` (``${env:NAME}`` references resolved;
    a one-line error if the server does not answer) and the URI as it may be shown."""
    from domaintune.credentials import resolve_env_refs

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as Prefect's and GX's analytics
    # MLflow writes a "View run" link made of the tracking URI to stdout when a run ends:
    # stdout is `domaintune run --json`'s, and the URI may carry credentials
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    uri = resolve_env_refs({"mlflow_uri": config.tracking.mlflow_uri}, "tracking")["mlflow_uri"]
    shown = redact(uri)
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError(
            "tracking.report_to lists mlflow but the MLflow client is not installed; rule: "
            "pip install 'domaintune[tracking]' (mlflow-skinny)"
        ) from None
    _check_answers(uri, shown)
    return MlflowClient(tracking_uri=uri), shown


def _check_answers(uri: str, shown: str) -> None:
    """An HTTP tracking server answers at all, within seconds (MLflow's own client retries a
    refused connection for minutes). Any HTTP status counts as an answer."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    try:
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")
        )
        with urllib.request.urlopen(url, timeout=10):
            return
    except urllib.error.HTTPError:
        return  # it answers (a proxy that wants credentials, a server without /health)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"tracking.mlflow_uri {shown}: the MLflow server does not answer "
            f"({redact(str(reason))}); rule: start it, or correct the URI"
        ) from None


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created at the same moment by another run
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise ConfigError(
            f"tracking.experiment {name!r}: the MLflow experiment is deleted; rule: restore it "
            "(mlflow experiments restore) or name another"
        )
    return found.experiment_id


def _create_run(client: Any, config: RetrainConfig, name: str, tags: dict[str, str]) -> str:
    """A new MLflow run in the use case's experiment, with the config as its parameters."""
    from mlflow.entities import Param

    experiment = _experiment_id(client, config.tracking.experiment or config.name)
    base = {
        f"{TAG}name": config.name,
        f"{TAG}domain": config.domain,
        f"{TAG}task": config.task.type,
    }
    run = client.create_run(
        experiment,
        run_name=name,
        tags={k: redact(str(v))[:_MAX_TAG_CHARS] for k, v in {**base, **tags}.items()},
    )
    params = [Param(k, v) for k, v in run_params(config).items()]
    client.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else ""


class _MlflowTraining:
    """The MLflow run of one training: metrics are sent by a background thread, several
    steps to a request when they come faster than the server takes them."""

    def __init__(self, client: Any, run_id: str, shown: str):
        from mlflow.entities import Metric

        self._metric = Metric
        self.client, self.run_id, self.shown = client, run_id, shown
        self.unsent = 0
        self._queue: queue.Queue[list[Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._send, name="mlflow-metrics", daemon=True)
        self._thread.start()

    @classmethod
    def start(
        cls, config: RetrainConfig, key: str, earlier: list[dict[str, Any]]
    ) -> _MlflowTraining:
        """The run of this training: a new one, or, when the stage is retried within the same
        flow run, the run of its earlier attempt (resumed from a checkpoint, as training is)."""
        client, shown = _client(config)
        flow_run_id = _flow_run_id()
        tags = {f"{TAG}finetune_key": key, f"{TAG}prefect_flow_run_id": flow_run_id}
        tags[f"{TAG}cached"] = "false"
        try:
            previous = next(
                (a["mlflow_run_id"] for a in reversed(earlier) if a.get("mlflow_run_id")), None
            )
            if previous:
                run = _get_run(client, previous)
                same_flow = run is not None and (
                    run.info.lifecycle_stage == "active"
                    and run.data.tags.get(f"{TAG}prefect_flow_run_id", "") == flow_run_id
                )
                if same_flow:
                    client.update_run(previous, status="RUNNING")
                    return cls(client, previous, shown)
                tags[f"{TAG}resumes_run"] = previous
            run_id = _create_run(client, config, f"{config.name}-{key[:8]}", tags)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"tracking.mlflow_uri {shown}: MLflow refused the training's run ({_one_line(exc)})"
            ) from None
        return cls(client, run_id, shown)

    def send(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._queue.put([self._metric(k, v, now, step) for k, v in metrics.items()])

    def _send(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            last = False
            while not last:  # what else is waiting goes in the same request
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                else:
                    batch += more
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:
                if not self.unsent:
                    log.warning(
                        "tracking: metrics not sent to MLflow at %s (the training goes on): %s",
                        self.shown,
                        _one_line(exc),
                    )
                self.unsent += len(batch)
            if last:
                return

    def close(self, succeeded: bool) -> None:
        self._queue.put(None)
        self._thread.join(_SEND_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning(
                "tracking: MLflow at %s still had metrics to take after %.0f s; left behind",
                self.shown,
                _SEND_TIMEOUT_S,
            )
        elif self.unsent:
            log.warning("tracking: %d metric values did not reach MLflow", self.unsent)
        try:  # a retry of the stage in the same flow run sets it RUNNING again
            self.client.set_terminated(self.run_id, "FINISHED" if succeeded else "FAILED")
        except Exception as exc:
            log.warning("tracking: MLflow run %s not ended: %s", self.run_id, _one_line(exc))


def _get_run(client: Any, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except Exception:  # deleted for good, or another server
        return None


# ----------------------------------------------------------------------------- the training


class TrainingTracker:
    """Tracks one attempt of the finetune stage from rank 0's progress events: TensorBoard
    event files and the MLflow run, as ``tracking.report_to`` says. It never fails the
    training once it has started; ``start`` fails, in one line, when MLflow cannot be used."""

    def __init__(self, writer: Any = None, mlflow: _MlflowTraining | None = None, folder=None):
        self.writer = writer
        self.mlflow = mlflow
        self.folder: Path | None = folder
        self._warned = False

    @classmethod
    def start(
        cls,
        config: RetrainConfig,
        key: str,
        work: Path,
        earlier: list[dict[str, Any]],
        attempt: dict[str, Any],
    ) -> TrainingTracker:
        """Before the launch: the MLflow run (recorded in ``attempt`` as ``mlflow_run_id``)
        and the event writer in ``work/tensorboard``. A resumed attempt hides from TensorBoard
        the events its predecessor wrote after the checkpoint it resumes from."""
        report_to = config.tracking.report_to
        mlflow = _MlflowTraining.start(config, key, earlier) if "mlflow" in report_to else None
        if mlflow is not None:
            attempt["mlflow_run_id"] = mlflow.run_id
        writer = folder = None
        if "tensorboard" in report_to:
            from tensorboardX import SummaryWriter

            resumed = (attempt.get("resumed_from") or "").rsplit("-", 1)[-1]
            step = int(resumed) if resumed.isdigit() else 0  # checkpoint-<step>, or a new start
            folder = work / TENSORBOARD_DIR
            first = not (folder.is_dir() and any(folder.iterdir()))
            writer = SummaryWriter(
                logdir=str(folder),
                # what earlier attempts logged after that step is logged again
                purge_step=None if first else step + 1,
                flush_secs=10,
                # a file of its own per attempt, even when two start within the same second
                filename_suffix=f".attempt{attempt.get('attempt', 1)}",
            )
            if first:
                writer.add_text("config", _params_markdown(config), 0)
        return cls(writer, mlflow, folder)

    def log(self, event: dict[str, Any]) -> None:
        """One ``log`` progress event of rank 0: its metrics at its step."""
        metrics = step_metrics(event)
        step = int(event.get("step") or 0)
        if not metrics:
            return
        if self.writer is not None:
            try:
                for name, value in metrics.items():
                    self.writer.add_scalar(name, value, step)
            except Exception as exc:
                if not self._warned:
                    log.warning("tracking: TensorBoard events not written: %s", _one_line(exc))
                self._warned = True
        if self.mlflow is not None:
            self.mlflow.send(metrics, step)

    def close(self, succeeded: bool) -> None:
        """The attempt ended: event files flushed and closed, metrics still on their way
        sent, the MLflow run FINISHED or FAILED."""
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as exc:
                log.warning("tracking: TensorBoard events not closed: %s", _one_line(exc))
        if self.mlflow is not None:
            self.mlflow.close(succeeded)

    def export(self, entry: Path) -> None:
        """Put the event files (of every attempt) into the finetune entry being written."""
        if self.folder is not None and self.folder.is_dir():
            shutil.copytree(self.folder, entry / TENSORBOARD_DIR, dirs_exist_ok=True)


# ------------------------------------------------------------------------------ end of a flow


def finish_run(
    config: RetrainConfig,
    summary: RunSummary,
    model: ModelArtifact,
    registration: Registration,
) -> str | None:
    """Complete this flow run's MLflow run: test metrics of the fine-tuned and the base
    model, the registry version and the promotion; with ``register_promotions``, a promoted
    version in MLflow's model registry. The training's run when this flow trained; otherwise
    a new run tagged ``domaintune.cached`` that names the entry and the run that trained it.
    Returns the run id. Never fails the flow (the model is registered by now): a problem is
    a warning."""
    if "mlflow" not in config.tracking.report_to:
        return None
    try:
        return _finish(config, summary, model, registration)
    except Exception as exc:
        log.warning(
            "tracking: the MLflow run of this flow run is incomplete at %s: %s",
            redact(config.tracking.mlflow_uri or ""),
            _one_line(exc),
        )
        return None


def _finish(
    config: RetrainConfig,
    summary: RunSummary,
    model: ModelArtifact,
    registration: Registration,
) -> str:
    from mlflow.entities import Metric, RunTag

    client, shown = _client(config)
    cached = {s.name: s.cached for s in summary.stages}
    trained_in = next(
        (a["mlflow_run_id"] for a in reversed(model.attempts) if a.get("mlflow_run_id")), None
    )
    new_run = bool(cached.get("finetune")) or trained_in is None
    if new_run:
        run_id = _create_run(
            client,
            config,
            f"{config.name}-{model.key[:8]}-cached",
            {
                f"{TAG}finetune_key": model.key,
                f"{TAG}prefect_flow_run_id": summary.run_id or "",
                f"{TAG}finetune_entry": model.model_dir,
                f"{TAG}trained_in_run": trained_in or "",
            },
        )
    else:
        run_id = trained_in
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"test/{which}/{k}", float(v), now, model.global_step)
        for which in ("finetuned", "base")
        for k, v in scalar_metrics(summary.metrics.get(which, {})).items()
    ]
    tags = {
        f"{TAG}cached": str(all(cached.values())).lower(),
        f"{TAG}cached_stages": ",".join(name for name, c in cached.items() if c),
        f"{TAG}registry_version": registration.version,
        f"{TAG}registered_model_dir": registration.model_dir,
        f"{TAG}promoted": str(registration.promoted).lower(),
        f"{TAG}promotion_reason": registration.promotion_reason,
        f"{TAG}primary_metric": summary.metrics.get("primary_metric") or "",
        f"{TAG}test_rows": str(summary.metrics.get("test_rows", "")),
    }
    client.log_batch(
        run_id,
        metrics=metrics,
        tags=[RunTag(k, redact(str(v))[:_MAX_TAG_CHARS]) for k, v in tags.items()],
    )
    if config.tracking.register_promotions and registration.promoted and not registration.reused:
        _register_champion(client, config, run_id, registration)
    if new_run:
        client.set_terminated(run_id, "FINISHED")
    log.info(
        "tracking: MLflow run %s in experiment %r at %s%s",
        run_id,
        config.tracking.experiment or config.name,
        shown,
        " (training cached)" if new_run else "",
    )
    return run_id


def _register_champion(
    client: Any, config: RetrainConfig, run_id: str, registration: Registration
) -> None:
    """The registered model folder as the run's ``model`` artifact, a version of the MLflow
    registered model named like the use case, and the alias ``champion`` on it."""
    from mlflow.exceptions import MlflowException

    from domaintune.registry import Registry
    from domaintune.storage.store import Store

    folder = Registry(Store.of(config), config.name).version_dir(registration.version) / "model"
    client.log_artifacts(run_id, str(folder), "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    try:
        client.create_registered_model(config.name, tags={f"{TAG}name": config.name})
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        config.name,
        source,
        run_id=run_id,
        tags={
            f"{TAG}registry_version": registration.version,
            f"{TAG}promotion_reason": redact(registration.promotion_reason)[:_MAX_TAG_CHARS],
        },
    )
    client.set_registered_model_alias(config.name, CHAMPION_ALIAS, version.version)
    client.set_tag(run_id, f"{TAG}mlflow_model_version", str(version.version))
    log.info(
        "tracking: %s %s is version %s of MLflow's registered model %r, alias %s",
        config.name,
        registration.version,
        version.version,
        config.name,
        CHAMPION_ALIAS,
    )
