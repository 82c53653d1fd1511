"""Experiment tracking (tracking.report_to): a real MLflow server (SQLite) on 127.0.0.1, read
back through MLflow's own client, and TensorBoard event files read by TensorBoard's own
reader, from one real retrain flow and its fully cached second run."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from domaintune.errors import ConfigError
from tests.conftest import write_csv
from tests.services import free_port, http_service


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """``mlflow server`` with a SQLite backend and local artifacts in ``folder``, on a free
    port of 127.0.0.1; its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with http_service(
        "mlflow server",
        cmd,
        f"{uri}/health",
        folder / "mlflow.log",
        {"MLFLOW_DISABLE_TELEMETRY": "true"},
        timeout=120,
        cwd=folder,
    ):
        yield uri


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> Iterator[str]:
    pytest.importorskip("mlflow", reason="the test extra (mlflow) is not installed")
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


# ------------------------------------------------------------------------------ config


def test_tracking_settings_are_checked_in_one_line(tmp_path, make_config):
    src = tmp_path / "x.csv"
    assert make_config(src).tracking.report_to == ["tensorboard"], "TensorBoard by default"
    with pytest.raises(ConfigError) as err:
        make_config(src, tracking={"report_to": ["tensorboard", "mlflow"]})
    assert "tracking: " in str(err.value) and "mlflow_uri is not set" in str(err.value)
    with pytest.raises(ConfigError, match="register_promotions needs mlflow"):
        make_config(src, tracking={"register_promotions": True})
    with pytest.raises(ConfigError, match=r"tracking\.report_to\.0: .*'tensorboard' or 'mlflow'"):
        make_config(src, tracking={"report_to": ["wandb"]})


def test_a_server_that_does_not_answer_stops_before_training(tmp_path, make_config):
    """One line naming the key, within seconds (MLflow's client would retry for minutes),
    and the URI's password is never shown."""
    pytest.importorskip("mlflow", reason="the tracking extra (mlflow-skinny) is not installed")
    from domaintune.reporting.tracking import TrainingTracker

    password = f"pw-{uuid.uuid4().hex}"
    cfg = make_config(
        tmp_path / "x.csv",
        tracking={
            "report_to": ["mlflow"],
            "mlflow_uri": f"http://tracker:{password}@127.0.0.1:{free_port()}",
        },
    )
    attempt: dict = {}
    t0 = time.time()
    with pytest.raises(ConfigError) as err:
        TrainingTracker.start(cfg, "k" * 16, tmp_path / "work", [], attempt)
    message = str(err.value)
    assert time.time() - t0 < 15
    assert message.startswith("tracking.mlflow_uri http://***@127.0.0.1:"), message
    assert "does not answer" in message and "\n" not in message
    assert password not in message and not attempt


def test_event_files_travel_with_an_entry_to_a_remote_store(tmp_path, make_config, s3, s3_store):
    """The events of a training go into the entry it writes, which a remote store uploads
    whole: another host finds them in the bucket (no training needed to show it)."""
    from domaintune.reporting.tracking import TrainingTracker
    from domaintune.storage.store import Store

    cfg = make_config(tmp_path / "x.csv", store=s3_store)
    tracker = TrainingTracker.start(cfg, "k" * 16, tmp_path / "work", [], {})
    tracker.log({"step": 5, "max_steps": 10, "epoch": 0.5, "loss": 0.7, "elapsed": 1.0})
    tracker.log({"step": 10, "max_steps": 10, "epoch": 1.0, "eval_accuracy": 0.9})
    tracker.close(succeeded=True)
    store = Store.of(cfg)
    with store.writer("finetune", "k" * 16) as w:
        tracker.export(w.path)
        w.manifest = {"key": "k" * 16}
    remote = store.remote_path("finetune", "k" * 16, "tensorboard")
    (name,) = [p for p in s3.fs().find(remote) if "tfevents" in p]
    local = tmp_path / "from-bucket"
    s3.fs().get(name, str(local / "events.out.tfevents.0"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(local))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/epoch", "eval/accuracy"}
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [
        (10, pytest.approx(0.9))
    ]


def test_a_retried_training_continues_its_run_and_its_event_files(
    tmp_path, make_config, mlflow_uri, monkeypatch
):
    """Attempt 2 of the stage in the same flow run (resumed from checkpoint-10) logs into
    attempt 1's MLflow run and purges the TensorBoard events attempt 1 wrote after step 10;
    the same entry trained in a later flow run gets a run of its own that names the first."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from domaintune.reporting import tracking

    cfg = make_config(
        tmp_path / "x.csv",
        tracking={
            "report_to": ["tensorboard", "mlflow"],
            "mlflow_uri": mlflow_uri,
            "experiment": "retries",
        },
    )
    work, key = tmp_path / "work", "r" * 16
    monkeypatch.setattr(tracking, "_flow_run_id", lambda: "flow-run-1")
    first: dict = {"attempt": 1, "resumed_from": None}
    tracker = tracking.TrainingTracker.start(cfg, key, work, [], first)
    for step in (5, 10, 15):
        tracker.log({"step": step, "loss": 1.0 / step})
    tracker.close(succeeded=False)  # the ranks died after step 15
    client = MlflowClient(mlflow_uri)
    run_id = first["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FAILED"

    second: dict = {"attempt": 2, "resumed_from": "checkpoint-10"}
    tracker = tracking.TrainingTracker.start(cfg, key, work, [first], second)
    assert second["mlflow_run_id"] == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in (15, 20):
        tracker.log({"step": step, "loss": 0.5 / step})
    tracker.close(succeeded=True)
    assert client.get_run(run_id).info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(history) == sorted(
        [(5, 0.2), (10, 0.1), (15, 1 / 15), (15, 0.5 / 15), (20, 0.025)]
    )
    events = EventAccumulator(str(work / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (5, pytest.approx(0.2)),
        (10, pytest.approx(0.1)),
        (15, pytest.approx(0.5 / 15)),
        (20, pytest.approx(0.025)),
    ], "attempt 1's step 15 (after checkpoint-10) is purged"

    monkeypatch.setattr(tracking, "_flow_run_id", lambda: "flow-run-2")
    third: dict = {"attempt": 3, "resumed_from": "checkpoint-20"}
    tracking.TrainingTracker.start(cfg, key, work, [first, second], third).close(True)
    assert third["mlflow_run_id"] != run_id
    tags = client.get_run(third["mlflow_run_id"]).data.tags
    assert tags["domaintune.resumes_run"] == run_id
    assert tags["domaintune.prefect_flow_run_id"] == "flow-run-2"


# -------------------------------------------------------------------------------- the flow


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_flow_run_is_tracked_in_mlflow_and_tensorboard(tmp_path, make_config, rows, mlflow_uri):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from domaintune.flows.retrain import retrain
    from tests.flows.test_retrain import run_logs, task_run_states

    src = write_csv(tmp_path / "data" / "train.csv", rows(40))
    password = f"pw-{uuid.uuid4().hex}"  # credentials in the URI: used, never shown
    uri = mlflow_uri.replace("http://", f"http://tracker:{password}@")
    tracking = {"mlflow_uri": uri, "experiment": "tracking-test"}
    first = retrain(
        make_config(
            src,
            tracking={
                **tracking,
                "report_to": ["tensorboard", "mlflow"],
                "register_promotions": True,
            },
        )
    )
    assert not any(s["cached"] for s in first["stages"]) and first["version"] == "v0001"
    keys = {s["name"]: s["key"] for s in first["stages"]}

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == f"test-uc-{keys['finetune'][:8]}"
    # parameters: the config, flattened, without the tracking section
    params = run.data.params
    assert params["task.type"] == "text_classification" and params["training.seed"] == "7"
    assert params["training.learning_rate"] == "0.005" and params["store.root"].endswith("store")
    assert json.loads(params["task.labels"]) == ["negative", "neutral", "positive"]
    assert not [k for k in params if k.startswith("tracking")]
    # per-step training and validation metrics, as rank 0 logged them
    loss = client.get_metric_history(run_id, "train/loss")
    steps = [m.step for m in loss]
    assert len(loss) >= 5 and steps == sorted(set(steps)) and steps[0] == 5, steps
    accuracy = client.get_metric_history(run_id, "eval/accuracy")
    assert len(accuracy) == 8, "one validation per epoch"
    assert {"eval/loss", "eval/macro_f1", "train/learning_rate", "train/grad_norm"} <= set(
        run.data.metrics
    )
    # final test metrics of the fine-tuned and the base model, the registry version
    m = first["metrics"]
    for which in ("finetuned", "base"):
        for name in ("accuracy", "macro_f1", "weighted_f1"):
            assert run.data.metrics[f"test/{which}/{name}"] == pytest.approx(m[which][name])
    tags = run.data.tags
    assert tags["domaintune.registry_version"] == "v0001" and tags["domaintune.promoted"] == "true"
    assert (
        tags["domaintune.cached"] == "false" and tags["domaintune.finetune_key"] == keys["finetune"]
    )
    assert tags["domaintune.prefect_flow_run_id"] == first["run_id"]
    # the promotion, mirrored to MLflow's model registry
    champion = client.get_model_version_by_alias("test-uc", "champion")
    assert champion.run_id == run_id and champion.tags["domaintune.registry_version"] == "v0001"
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}

    # TensorBoard event files in the finetune entry, the same scalars, read by TensorBoard
    entry = tmp_path / "store" / "finetune" / keys["finetune"]
    events = EventAccumulator(str(entry / "tensorboard"))
    events.Reload()
    assert {"train/loss", "eval/accuracy", "eval/loss"} <= set(events.Tags()["scalars"])
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [
        (x.step, round(x.value, 4)) for x in loss
    ]
    assert "config/text_summary" in events.Tags()["tensors"], "the config as text"
    model_dir = Path(first["model_dir"])
    assert not [p for p in model_dir.rglob("*") if "tfevents" in p.name or p.name == "tensorboard"]

    # the password reached neither the logs, the summary nor the registry
    logs = "\n".join(run_logs(first["run_id"]))
    assert f"MLflow run {run_id} in experiment 'tracking-test' at http://***@127.0.0.1" in logs
    for text in (logs, json.dumps(first), (model_dir.parent / "config.yaml").read_text()):
        assert password not in text

    # other tracking settings: every stage Cached under the same keys, and a run that says so
    second = retrain(make_config(src, tracking={**tracking, "report_to": ["mlflow"]}))
    assert all(s["cached"] for s in second["stages"]), second["stages"]
    assert {s["name"]: s["key"] for s in second["stages"]} == keys
    assert set(task_run_states(second["run_id"]).values()) == {"Cached"}
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2 and runs[1].info.run_id == run_id
    cached = runs[0]
    assert cached.info.status == "FINISHED" and cached.info.run_name.endswith("-cached")
    assert cached.data.tags["domaintune.cached"] == "true"
    assert cached.data.tags["domaintune.trained_in_run"] == run_id
    assert cached.data.tags["domaintune.finetune_entry"] == str(entry)
    assert cached.data.tags["domaintune.registry_version"] == "v0001"
    assert cached.data.params["training.seed"] == "7"
    assert cached.data.metrics["test/finetuned/accuracy"] == pytest.approx(
        m["finetuned"]["accuracy"]
    )
    assert not client.get_metric_history(cached.info.run_id, "train/loss"), "nothing trained"
    versions = client.search_model_versions("name = 'test-uc'")
    assert [v.version for v in versions] == ["1"], "a reused registration is not mirrored again"
