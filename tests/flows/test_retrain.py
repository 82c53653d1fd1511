"""The whole retrain flow on a real (temporary) Prefect server, with real GX and DeepSpeed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from domaintune.errors import ContractViolation
from domaintune.training.launch import cpu_bf16_features
from tests.conftest import write_csv

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

STAGES = ["ingest", "validate", "preprocess", "monitor", "finetune", "evaluate", "register"]


def task_run_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name: r.state.name for r in runs}


def run_logs(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def run_artifacts(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def cached(summary: dict) -> dict[str, bool]:
    return {s["name"]: s["cached"] for s in summary["stages"]}


def test_flow_runs_end_to_end_and_caches_by_content(tmp_path, make_config, rows):
    from transformers import AutoModelForSequenceClassification

    from domaintune.flows.retrain import retrain
    from domaintune.tasks.preprocess import split_point

    data = rows(40)
    src = write_csv(tmp_path / "data" / "train.csv", data)
    cfg = make_config(src)
    ev = cfg.evaluation  # each row's split from its own text: these rows are the test split
    in_test = sum(split_point(r["text"], ev.split_seed) < ev.test_size for r in data)

    first = retrain(cfg)
    assert [s["name"] for s in first["stages"]] == STAGES
    assert not any(cached(first).values())
    m = first["metrics"]
    assert m["primary_metric"] == "accuracy" and m["test_rows"] == in_test > 0
    assert m["finetuned"]["accuracy"] > m["base"]["accuracy"], m
    assert {"accuracy", "macro_f1"} <= set(m["base"])
    assert first["promoted"] and first["version"] == "v0001"
    model_dir = Path(first["model_dir"])
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.rglob("*.bin")) and not list(model_dir.rglob("*.pt")), (
        "no pickles in the model"
    )
    loaded = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert loaded.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    reg = model_dir.parent
    lineage = json.loads((reg / "lineage.json").read_text())
    assert lineage["prefect_flow_run_id"] == first["run_id"]
    assert lineage["raw_snapshot"]["sources"][0]["path"] == str(src)
    assert (reg.parent / "latest").read_text() == "v0001" == (reg.parent / "production").read_text()
    assert set(task_run_states(first["run_id"]).values()) == {"Completed"}
    messages = run_logs(first["run_id"])
    assert any(m.startswith("train: step=") for m in messages), "training progress reaches Prefect"
    # precision auto: bf16 where this CPU does bf16 in hardware, fp32 elsewhere
    precision = "bf16" if cpu_bf16_features() else "fp32"
    assert any(
        m.startswith(f"finetune: launching 1 CPU rank(s), world size 1, {precision}")
        and "through the DeepSpeed launcher" in m
        for m in messages
    )
    assert any(
        m.startswith(f"finetune: precision: {precision}") and "this CPU has" in m for m in messages
    )
    artifacts = run_artifacts(first["run_id"])
    assert {"table", "markdown", "progress"} <= {a.type for a in artifacts}, "artifacts attached"
    bars = [a for a in artifacts if a.type == "progress"]
    assert float(bars[0].data) == 100.0, "the training progress bar reached the end"
    report_md = [a.data for a in artifacts if a.description == "Evaluation report"]
    assert report_md and report_md[0].count("](data:image/svg+xml;base64,") == 2, (
        "loss curve and confusion matrix images in the report"
    )
    training_md = [a.data for a in artifacts if (a.description or "").startswith("Fine-tuning")]
    assert training_md and "Trainable parameters: **" in training_md[0], "strategy in the UI"
    t = first["training"]
    assert t["strategy"] == "full" and t["trainable_parameters"] == t["total_parameters"] > 0
    assert t["world_size"] == 1 and t["precision"] == precision and t["tokens_per_second"] > 0
    assert first["trust_remote_code"] is False, "the summary says whether model code could run"

    # the same config again: nothing is recomputed, and Prefect shows every stage as Cached
    second = retrain(cfg)
    assert all(cached(second).values()), second["stages"]
    assert task_run_states(second["run_id"]) == {name: "Cached" for name in STAGES}
    assert second["version"] == "v0001" and second["metrics"] == first["metrics"]

    # a new max_length re-tokenizes and retrains, but keeps ingest and validate
    third = retrain(make_config(src, training={"max_length": 24}))
    assert cached(third) == {
        "ingest": True,
        "validate": True,
        "preprocess": False,
        "monitor": False,  # it reads the new splits
        "finetune": False,
        "evaluate": False,
        "register": False,
    }
    assert third["version"] == "v0002"

    # a changed data file recomputes everything
    write_csv(src, rows(40, seed=5))
    fourth = retrain(cfg)
    assert not any(cached(fourth).values()), fourth["stages"]


def test_contract_violation_stops_the_flow_before_training(tmp_path, make_config, rows):
    from domaintune.flows.retrain import retrain
    from domaintune.orchestration import failed_run_stages

    r = rows(15)
    for i in range(0, 12, 3):
        r[i]["label"] = "bullish"
    src = write_csv(tmp_path / "bad.csv", r)
    before = src.read_bytes()
    cfg = make_config(src)
    state = retrain(cfg, return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, ContractViolation)
    assert "label_in_set" in str(exc) and "'bullish'" in str(exc)
    stages = failed_run_stages(str(state.state_details.flow_run_id))
    assert [s.name for s in stages] == ["ingest", "validate"]
    store = Path(cfg.store.root)
    raw = list((store / "ingest").glob("*/raw.parquet"))
    assert len(raw) == 1, "the raw snapshot is kept"
    assert not (store / "preprocess").exists() and not (store / "finetune").exists()
    assert not (store / "registry").exists(), "nothing registered, nothing promoted"
    assert src.read_bytes() == before
    states = task_run_states(str(state.state_details.flow_run_id))
    assert states == {"ingest": "Completed", "validate": "Failed"}, "bad data is not retried"


def test_quarantined_rows_are_left_out_and_the_run_goes_on(tmp_path, make_config, rows):
    from domaintune.flows.retrain import retrain

    r = rows(15)
    for i in range(0, 12, 3):
        r[i]["label"] = "bullish"  # 4 of 45 rows: 8.9%
    src = write_csv(tmp_path / "bad.csv", r)
    before = src.read_bytes()
    cfg = make_config(
        src, data={"on_invalid": "quarantine", "max_invalid_share": 0.1}, training={"epochs": 2}
    )
    summary = retrain(cfg)
    assert summary["status"] == "completed" and summary["version"] == "v0001"
    assert summary["quarantined_rows"] == 4
    q = pd.read_parquet(summary["quarantine_table"])
    assert set(q["label"]) == {"bullish"} and q["_reasons"].str.contains("label_in_set").all()
    assert summary["metrics"]["test_rows"] + 4 < 45
    lineage = json.loads((Path(summary["model_dir"]).parent / "lineage.json").read_text())
    assert lineage["splits"]["quarantined"] == 4, "the registry records what was left out"
    assert src.read_bytes() == before
    reports = [a.data for a in run_artifacts(summary["run_id"]) if a.type == "markdown"]
    assert any("PASSED with 4 row(s) quarantined" in md for md in reports), "shown in the UI"
    assert any("4 row(s) (8.89% of the data" in m for m in run_logs(summary["run_id"]))
    # the default share (5%) stops the same data before training
    strict = make_config(src, data={"on_invalid": "quarantine"})
    state = retrain(strict, return_state=True)
    assert state.is_failed()
    assert "invalid_share" in str(state.result(raise_on_failure=False)).splitlines()[0]


def _kill_worker_after_first_checkpoint(work_root: Path, killed: dict) -> None:
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline:
        markers = list(
            work_root.glob("finetune/.work/*/checkpoints/checkpoint-*/.domaintune-complete")
        )
        if markers:
            for proc in psutil.Process(os.getpid()).children(recursive=True):
                try:
                    if "domaintune.training.worker" in " ".join(proc.cmdline()):
                        killed["step"] = max(int(m.parent.name.split("-")[1]) for m in markers)
                        proc.send_signal(signal.SIGKILL)
                        killed["pid"] = proc.pid
                except psutil.Error:
                    continue
            if "pid" in killed:
                return
        time.sleep(0.02)


def test_killed_training_process_is_resumed_from_its_checkpoint_on_retry(
    tmp_path, make_config, rows
):
    from domaintune.flows.retrain import retrain

    src = write_csv(tmp_path / "data.csv", rows(40))
    cfg = make_config(
        src,
        training={"max_steps": 80, "epochs": 50, "batch_size": 8, "checkpoint_every_steps": 5},
        retries={"count": 1, "delay_seconds": 0},
    )
    killed: dict = {}
    watcher = threading.Thread(
        target=_kill_worker_after_first_checkpoint, args=(Path(cfg.store.root), killed)
    )
    watcher.start()
    summary = retrain(cfg)
    watcher.join()
    assert "pid" in killed, "the training process was never killed"
    model_dir = Path(summary["model_dir"]).parent / "lineage.json"
    attempts = json.loads(model_dir.read_text())["model"]["attempts"]
    assert len(attempts) == 2
    assert attempts[0]["resumed_from"] is None and attempts[0]["exit_code"] != 0
    resumed = attempts[1]["resumed_from"]
    assert resumed is not None and int(resumed.split("-")[1]) >= 5
    assert attempts[1]["exit_code"] == 0
    states = task_run_states(summary["run_id"])
    assert states["finetune"] == "Completed"
    history = json.loads(
        (Path(summary["model_dir"]).parent / "model" / "training_summary.json").read_text()
    )
    assert history["global_step"] == 80 and history["resumed_from"].endswith(resumed)
    assert history["start_step"] == int(resumed.split("-")[1]), (
        "the retry continued, it did not start over"
    )
