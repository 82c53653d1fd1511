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
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import yaml

from domaintune.serve import deploy, free_port, start_server, start_worker
from tests.conftest import LABELS, write_csv

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _api(api: str, path: str, body: dict | None = None) -> object:
    """POST to the Prefect API. A 503 is Prefect's "retry": the server rolled back on a
    retryable database error (SQLite busy under load); its own client retries it too."""
    for attempt in range(6):
        req = urllib.request.Request(
            f"{api}/{path}",
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 5:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


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


@pytest.fixture(scope="module")
def ops(tmp_path_factory, tiny_model):
    """A real Prefect server on a free port, the project's deployments (the finance one on
    the tiny model), and a process worker."""
    tmp_path = tmp_path_factory.mktemp("ops")
    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    doc.pop("definitions", None)
    landing = tmp_path / "landing"
    store = tmp_path / "store"
    for dep in doc["deployments"]:
        cfg = dep["parameters"]["config"]
        cfg["store"] = {"root": str(store)}
        if cfg["domain"] == "finance":  # runs here use the tiny model: seconds, not minutes
            cfg["model"] = {"name_or_path": str(tiny_model)}
            cfg["data"] = {"source": str(landing / "finance" / "*.csv")}
            cfg["training"] = {
                "epochs": 8,
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
        worker = start_worker("domaintune", tmp_path / "logs", env)
        deployments = {d["name"]: d for d in _api(api, "deployments/filter")}
        yield {
            "api": api,
            "env": env,
            "tmp": tmp_path,
            "landing": landing,
            "store": store,
            "deployments": deployments,
        }
    finally:
        _stop(worker, server)


def _wait_completed(api: str, deployment_id: str, logs: Path, exclude=(), timeout=420) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = _api(
            api,
            "flow_runs/filter",
            {
                "deployments": {"id": {"any_": [deployment_id]}},
                "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}},
            },
        )
        for run in runs:
            if run["id"] in exclude:
                continue
            state = run["state"]["type"]
            assert state not in ("FAILED", "CRASHED"), (
                run["state"].get("message"),
                (logs / "worker.log").read_text()[-4000:],
            )
            if state == "COMPLETED":
                return run
        time.sleep(3)
    raise AssertionError((logs / "worker.log").read_text()[-3000:])


def _version_of(store: Path, name: str, flow_run_id: str) -> Path:
    for v in sorted((store / "registry" / name).glob("v0*")):
        if json.loads((v / "lineage.json").read_text())["prefect_flow_run_id"] == flow_run_id:
            return v
    raise AssertionError(f"no version of {name} from flow run {flow_run_id}")


def test_deployments_schedules_triggers_and_a_data_arrival_run(ops, rows):
    api, env = ops["api"], ops["env"]
    deployments = ops["deployments"]
    assert {"finance-sentiment", "healthcare-diagnosis", "ecommerce-reviews"} <= set(deployments)
    finance = deployments["finance-sentiment"]
    assert finance["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"
    assert "finance" in finance["tags"]
    triggers = [a["trigger"] for a in _api(api, "automations/filter")]
    for domain in ("finance", "healthcare", "ecommerce"):
        assert any(
            t.get("match", {}).get("prefect.resource.id") == f"domaintune.domain.{domain}"
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

    batch = write_csv(ops["tmp"] / "incoming" / "batch-1.csv", rows(30))
    added = subprocess.run(
        [sys.executable, "-m", "domaintune.cli", "data", "add", "finance", str(batch),
         "--landing", str(ops["landing"]), "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr[-2000:]
    assert json.loads(added.stdout)["announced"][0]["path"].endswith("batch-1.csv")
    done = _wait_completed(api, finance["id"], ops["tmp"] / "logs")
    version = _version_of(ops["store"], "finance-sentiment", done["id"])
    lineage = json.loads((version / "lineage.json").read_text())
    assert lineage["raw_snapshot"]["sources"][0]["path"].endswith("batch-1.csv")
    registry = ops["store"] / "registry" / "finance-sentiment"
    production = registry / "production"
    champion = production.read_text() if production.exists() else None

    # a worse model (a learning rate too small to learn anything) is registered, not promoted
    config = json.loads(json.dumps(finance["parameters"]["config"]))
    config["training"]["learning_rate"] = 1e-12
    worse = _api(
        api, f"deployments/{finance['id']}/create_flow_run", {"parameters": {"config": config}}
    )
    done = _wait_completed(api, finance["id"], ops["tmp"] / "logs", exclude={done["id"]})
    assert done["id"] == worse["id"]
    rejected = json.loads(
        (
            _version_of(ops["store"], "finance-sentiment", done["id"]) / "registration.json"
        ).read_text()
    )
    assert not rejected["promoted"] and "does not beat" in rejected["promotion_reason"]
    assert (production.read_text() if production.exists() else None) == champion


@pytest.mark.browser
def test_a_custom_run_from_the_ui_uses_the_changed_parameter(ops, rows):
    """Headless Chromium opens the Prefect UI, starts a custom run of the finance deployment
    with training.epochs changed in the parameter form, and sees it complete."""
    import re
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make install adds it with apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from domaintune import landing

    more = write_csv(ops["tmp"] / "ui" / "more.csv", rows(30, seed=11))
    landing.add_files("finance", [more], ops["landing"])
    api = ops["api"]
    ui = api[: -len("/api")]
    finance = ops["deployments"]["finance-sentiment"]
    earlier = {r["id"] for r in _api(api, "flow_runs/filter")}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui}/deployments/deployment/{finance['id']}/run", wait_until="networkidle")
            label = page.locator(".schema-form-property__label", has_text=re.compile(r"^Epochs"))
            epochs = page.locator(".schema-form-property").filter(has=label).last
            box = epochs.locator("input[type=number]").first
            assert box.input_value() == "8", "the form shows the deployment's default"
            box.fill("2")
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+(\?.*)?$"), timeout=60_000)
            done = _wait_completed(api, finance["id"], ops["tmp"] / "logs", exclude=earlier)
            run_id = done["id"]
            assert done["parameters"]["config"]["training"]["epochs"] == 2
            page.goto(f"{ui}/runs/flow-run/{run_id}", wait_until="networkidle")
            page.get_by_text("Completed").first.wait_for(timeout=30_000)
        finally:
            browser.close()
    version = _version_of(ops["store"], "finance-sentiment", run_id)
    assert yaml.safe_load((version / "config.yaml").read_text())["training"]["epochs"] == 2


def test_serve_starts_server_deployments_and_worker_and_stops_them(tmp_path):
    import signal

    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(tmp_path / "home")
    env["DOMAINTUNE_LANDING"] = str(tmp_path / "landing")
    proc = subprocess.Popen(
        [sys.executable, "-m", "domaintune.cli", "serve", "--json", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        info = json.loads(proc.stdout.readline())
        with urllib.request.urlopen(info["ui"], timeout=10) as r:
            assert r.status == 200, "the UI answers"
        port = int(info["api"].rsplit(":", 1)[1].split("/")[0])
        listening = {
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listening == {"127.0.0.1"}, f"the server listens on {listening}, not loopback only"
        names = {d["name"] for d in _api(info["api"], "deployments/filter")}
        assert {"finance-sentiment", "healthcare-diagnosis", "ecommerce-reviews"} <= names
        deadline = time.time() + 60
        workers = []
        while time.time() < deadline and not workers:
            workers = _api(info["api"], "work_pools/domaintune/workers/filter")
            time.sleep(1)
        assert workers, "a worker polls the pool"

        # with PREFECT_API_URL set, serve uses that server as it is and starts none
        other = subprocess.Popen(
            [sys.executable, "-m", "domaintune.cli", "serve", "--json", "--no-watch"],
            cwd=ROOT,
            env={**env, "PREFECT_API_URL": info["api"]},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            assert json.loads(other.stdout.readline())["api"] == info["api"]
        finally:
            os.killpg(other.pid, signal.SIGTERM)
            assert other.wait(timeout=60) == 0
        with urllib.request.urlopen(info["api"] + "/health", timeout=5) as r:
            assert r.status == 200, "stopping the second serve left the server it found alone"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    with pytest.raises(OSError):  # the server it started is gone with it
        urllib.request.urlopen(info["api"] + "/health", timeout=3)
