"""Operations against a real `prefect server start` on 127.0.0.1: the deployments of
deployments/prefect.yaml register with their schedules and triggers, the scheduler creates
their weekly runs, and `domaintune data add` leads, through the trigger and a process worker,
to a completed flow run and a new registered version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from domaintune.serve import deploy, free_port, start_server, start_worker
from tests.conftest import LABELS, write_csv

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _api(api: str, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(
        f"{api}/{path}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _stop(*procs):
    import signal

    for p in procs:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        if p is not None:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def test_deployments_schedules_triggers_and_a_data_arrival_run(tmp_path, tiny_model, rows):
    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    doc.pop("definitions", None)
    landing = tmp_path / "landing"
    store = tmp_path / "store"
    for dep in doc["deployments"]:
        cfg = dep["parameters"]["config"]
        cfg["store"] = {"root": str(store)}
        if cfg["domain"] == "finance":  # the triggered run: the tiny model, a few seconds
            cfg["model"] = {"name_or_path": str(tiny_model)}
            cfg["data"] = {"source": str(landing / "finance" / "*.csv")}
            cfg["training"] = {
                "epochs": 4,
                "learning_rate": 5e-3,
                "batch_size": 8,
                "max_length": 32,
                "early_stopping_patience": None,
            }
            cfg["task"]["labels"] = LABELS
            cfg["evaluation"] = {"test_size": 0.2, "val_size": 0.15}
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(doc, sort_keys=False))

    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["DOMAINTUNE_PROJECT_DIR"] = str(ROOT)
    server = worker = None
    try:
        server, api = start_server(free_port(), tmp_path / "logs", env)
        env["PREFECT_API_URL"] = api
        deploy(str(prefect_file), "domaintune", env, cwd=ROOT)

        deployments = {d["name"]: d for d in _api(api, "deployments/filter")}
        assert {"finance-sentiment", "healthcare-diagnosis", "ecommerce-reviews"} <= set(
            deployments
        )
        finance = deployments["finance-sentiment"]
        assert finance["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"
        assert "finance" in finance["tags"]
        automations = _api(api, "automations/filter")
        triggers = [a["trigger"] for a in automations]
        assert any(
            t.get("match", {}).get("prefect.resource.id") == "domaintune.domain.finance"
            and t.get("expect") == ["domaintune.data.arrived"]
            for t in triggers
        ), triggers

        # the scheduler creates the weekly runs ahead of time
        deadline = time.time() + 90
        scheduled = []
        while time.time() < deadline and not scheduled:
            scheduled = _api(
                api,
                "flow_runs/filter",
                {
                    "deployments": {"id": {"any_": [finance["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                },
            )
            time.sleep(2)
        assert scheduled, "no scheduled run was created"
        start = datetime.fromisoformat(scheduled[0]["expected_start_time"].replace("Z", "+00:00"))
        assert (start.weekday(), start.hour, start.minute) == (0, 3, 0)

        worker = start_worker("domaintune", tmp_path / "logs", env)
        batch = write_csv(tmp_path / "incoming" / "batch-1.csv", rows(30))
        added = subprocess.run(
            [sys.executable, "-m", "domaintune.cli", "data", "add", "finance", str(batch),
             "--landing", str(landing), "--json"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr[-2000:]
        assert json.loads(added.stdout)["announced"][0]["path"].endswith("batch-1.csv")

        deadline = time.time() + 420
        done = None
        while time.time() < deadline and done is None:
            runs = _api(
                api,
                "flow_runs/filter",
                {
                    "deployments": {"id": {"any_": [finance["id"]]}},
                    "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}},
                },
            )
            for run in runs:
                state = run["state"]["type"]
                assert state not in ("FAILED", "CRASHED"), run["state"]
                if state == "COMPLETED":
                    done = run
            time.sleep(3)
        assert done is not None, (tmp_path / "logs" / "worker.log").read_text()[-3000:]
        registry = store / "registry" / "finance-sentiment"
        assert (registry / "latest").read_text() == "v0001"
        lineage = json.loads((registry / "v0001" / "lineage.json").read_text())
        assert lineage["prefect_flow_run_id"] == done["id"]
        assert lineage["raw_snapshot"]["sources"][0]["path"].endswith("batch-1.csv")
    finally:
        _stop(worker, server)
