"""`domaintune serve`: a Prefect server on PostgreSQL on 127.0.0.1, the deployments of
deployments/prefect.yaml, a worker, the landing watcher; it stops what it started, uses a
server it is pointed at as it is, and refuses a database it cannot use in one line without
the password. (The deployments' schedules, triggers and runs on a Postgres-backed server with
two workers and an S3 store: tests/test_production.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from domaintune.serving.serve import free_port
from tests.services import prefect_api as _api

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_serve_starts_server_deployments_and_worker_and_stops_them(tmp_path, postgres):
    import signal

    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(tmp_path / "home")
    env["DOMAINTUNE_LANDING"] = str(tmp_path / "landing")
    env["DT_SERVE_DATABASE"] = postgres.create_database("serve_test")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "domaintune.cli",
            "serve",
            "--json",
            "--port",
            str(free_port()),
            "--database-url",
            "${env:DT_SERVE_DATABASE}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        assert postgres.password not in line
        assert info["database"].startswith("postgresql+asyncpg://prefect:***@127.0.0.1:")
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
        names = {a["name"] for a in _api(info["api"], "automations/filter")}
        assert {
            "domaintune: crash silent retrain runs",
            "domaintune: retry crashed retrain runs",
        } <= names

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
    logs = "".join(p.read_text() for p in (ROOT / ".domaintune-serve").glob("*.log"))
    assert postgres.password not in logs


@pytest.mark.parametrize("case", ["wrong password", "nothing listening", "not postgres"])
def test_serve_refuses_a_database_it_cannot_use_in_one_line_without_the_password(
    tmp_path, postgres, case
):
    secret = "Wr0ng-pa55word-xyz"
    url = {
        "wrong password": f"postgresql+asyncpg://prefect:{secret}@127.0.0.1:{postgres.port}/prefect",
        "nothing listening": f"postgresql+asyncpg://prefect:{secret}@127.0.0.1:{free_port()}/x",
        "not postgres": f"mysql://prefect:{secret}@127.0.0.1:3306/prefect",
    }[case]
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(tmp_path / "home")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = url
    result = subprocess.run(
        [sys.executable, "-m", "domaintune.cli", "serve", "--port", str(free_port()), "--no-watch"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("domaintune serve: database "), lines
    assert secret not in result.stderr + result.stdout
    assert "prefect:***@127.0.0.1" in lines[0], lines[0]
