"""A production set-up on one machine, for tests/test_production.py and bench/scaleout.py:
a Prefect server on PostgreSQL, the deployments of deployments/prefect.yaml with the
automations of ``domaintune serve``, an S3 store and landing zones, and worker "hosts" with
their own ``HOME``, ``PREFECT_HOME`` and local cache. Everything on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from domaintune.serving.serve import deploy, ensure_automations, start_server, start_worker
from tests.conftest import write_csv
from tests.services import Postgres, S3Server, free_port, kill_tree, prefect_api, stop

ROOT = Path(__file__).resolve().parent.parent
POOL = "domaintune"
# A worker stops on SIGTERM once its flow runs are done (0.3-0.5 s when this module runs alone,
# or after the same files on one xdist worker). In the full two-worker suite none of the 4
# stops was answered within 60 s, and each waited out the grace before the SIGKILL: 4 min of
# the suite. The stops here come after the runs have ended, so a short grace loses nothing.
WORKER_GRACE = 10.0


@dataclass
class Host:
    name: str
    env: dict[str, str]
    cache: Path
    worker: subprocess.Popen | None = None


@dataclass
class Cluster:
    api: str
    root: Path
    bucket: str
    store: dict
    landing: str
    s3: S3Server | None = None
    hosts: dict[str, Host] = field(default_factory=dict)
    deployments: dict = field(default_factory=dict)
    server: subprocess.Popen | None = None
    server_env: dict[str, str] = field(default_factory=dict)

    def restart_server(self, down: float = 0.0) -> None:
        """Stop the Prefect API server, stay down ``down`` seconds, start it again on the
        same port and database: a server restart during a deploy, as workers and flow runs
        meet it."""
        stop(self.server, timeout=30)
        time.sleep(down)
        port = int(self.api.rsplit(":", 1)[1].split("/")[0])
        self.server, _ = start_server(port, self.logs, self.server_env)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def start(self, name: str) -> None:
        host = self.hosts[name]
        if host.worker is None or host.worker.poll() is not None:
            host.worker = start_worker(POOL, self.logs, host.env, name=f"host-{name}")
            self._wait_for_worker(f"host-{name}")

    def _wait_for_worker(self, name: str) -> None:
        deadline = time.time() + 90
        while time.time() < deadline:
            workers = prefect_api(self.api, f"work_pools/{POOL}/workers/filter")
            if any(w["name"] == name and w["status"] == "ONLINE" for w in workers):
                return
            time.sleep(1)
        raise AssertionError(f"worker {name} never came online: {self.worker_log(name)}")

    def stop(self, name: str) -> None:
        stop(self.hosts[name].worker, timeout=WORKER_GRACE)
        self.hosts[name].worker = None

    def kill(self, name: str) -> list[int]:
        """SIGKILL the worker and every process under it: the host is gone."""
        host = self.hosts[name]
        killed = kill_tree(host.worker.pid)
        host.worker.wait(timeout=30)
        host.worker = None
        return killed

    def worker_log(self, name: str) -> str:
        p = self.logs / f"host-{name}.log"
        return p.read_text()[-4000:] if p.is_file() else ""

    def run_cli(self, name: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "domaintune.cli", *args],
            env=self.hosts[name].env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # ------------------------------------------------------------------ the API
    def run_of(self, run_id: str) -> dict:
        return prefect_api(self.api, f"flow_runs/{run_id}", method="GET")

    def wait_final(self, run_id: str, timeout: float = 600) -> dict:
        """The run once it is final (a crash counts only when no retry will follow)."""
        deadline = time.time() + timeout
        while True:
            run = self.run_of(run_id)
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CANCELLED") or (
                run["state"]["type"] == "CRASHED" and run["run_count"] > 2
            ):
                return run
            if time.time() > deadline:
                raise AssertionError(
                    f"run {run_id} still {run['state']['name']}:\nA: {self.worker_log('a')}\n"
                    f"B: {self.worker_log('b')}"
                )
            time.sleep(2)

    def states(self, run_id: str) -> list[str]:
        states = prefect_api(self.api, f"flow_run_states/?flow_run_id={run_id}", method="GET")
        return [s["name"] for s in sorted(states, key=lambda s: s["timestamp"])]

    def runs_of(self, deployment_id: str, exclude: set[str]) -> list[dict]:
        """The deployment's runs not created by its schedule, but those in ``exclude``."""
        runs = prefect_api(
            self.api, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}}
        )
        return [r for r in runs if r["id"] not in exclude and not r["auto_scheduled"]]

    def create_run(self, deployment: str, config: dict) -> dict:
        """A run of ``deployment`` with a typed config, started through the API."""
        dep = self.deployments[deployment]
        return prefect_api(
            self.api, f"deployments/{dep['id']}/create_flow_run", {"parameters": {"config": config}}
        )

    # ------------------------------------------------------------------ the store
    def registry(self, name: str) -> dict:
        """The registry of a use case as the bucket holds it: events, production, paths."""
        fs = self.s3.fs()
        reg = f"{self.bucket}/store/registry/{name}"
        events = [json.loads(fs.cat_file(p)) for p in sorted(fs.glob(f"{reg}/log/*.json"))]
        production = (
            fs.cat_file(f"{reg}/production").decode() if fs.exists(f"{reg}/production") else None
        )
        return {"events": events, "production": production, "fs": fs, "path": reg}

    def put_csv(self, url: str, rows: list[dict]) -> str:
        """A CSV of ``rows`` at ``url`` (s3://...) in the S3 server."""
        local = write_csv(self.root / "csv" / url.rsplit("/", 1)[-1], rows)
        self.s3.fs().put_file(str(local), url[len("s3://") :])
        return url


@contextlib.contextmanager
def production_cluster(
    root: Path,
    postgres: Postgres,
    s3: S3Server,
    finance_config: Callable[[dict, str], dict],
    crash_after: float = 45.0,
    lease_ttl: float = 10.0,
    tiny_config: Callable[[dict, str], dict] | None = None,
) -> Iterator[Cluster]:
    """Start the server on a new database of ``postgres``, deploy, create the automations,
    and prepare hosts ``a`` and ``b`` (their workers start with ``cluster.start``).
    ``finance_config(store, source)`` gives the finance deployment's config;
    ``tiny_config(store, source)``, if given, the model, training and evaluation sections
    of the e-commerce deployments (the rest of their config, its retrain policy included,
    as deployments/prefect.yaml has it)."""
    bucket = s3.bucket("prod")
    store = {"root": f"s3://{bucket}/store"}
    landing = f"s3://{bucket}/landing"
    aws = {
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_ENDPOINT_URL_S3": s3.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    server_env = {
        **base,
        "PREFECT_HOME": str(root / "server-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.create_database(
            f"prefect_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
        ),
    }
    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    doc.pop("definitions", None)
    for dep in doc["deployments"]:
        cfg = dep["parameters"]["config"]
        cfg["store"] = store
        if cfg.get("domain") == "finance":
            dep["parameters"]["config"] = finance_config(store, f"{landing}/finance/*.csv")
        elif cfg.get("domain") == "ecommerce" and tiny_config is not None:
            tiny = tiny_config(store, f"{landing}/ecommerce/*.csv")
            dep["parameters"]["config"] = {
                **cfg,
                **{k: tiny[k] for k in ("model", "training", "evaluation", "retries")},
                "data": tiny["data"],
                "task": tiny["task"],
            }
    root.mkdir(parents=True, exist_ok=True)
    prefect_file = root / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(doc, sort_keys=False))

    server = None
    c = None
    try:
        server, api = start_server(free_port(), root / "logs", server_env)
        deploy_env = {**base, "PREFECT_API_URL": api, "PREFECT_HOME": str(root / "deployer")}
        deploy(str(prefect_file), POOL, deploy_env, cwd=ROOT)
        ensure_automations(deploy_env, crash_after)
        c = Cluster(
            api=api, root=root, bucket=bucket, store=store, landing=landing, s3=s3,
            server=server, server_env=server_env,
        )  # fmt: skip
        for name in ("a", "b"):
            home = root / f"host-{name}"
            c.hosts[name] = Host(
                name=name,
                cache=home / "cache",
                env={
                    **base,
                    **aws,
                    "HOME": str(home / "home"),
                    "PREFECT_HOME": str(home / "prefect"),
                    "DOMAINTUNE_CACHE": str(home / "cache"),
                    "PREFECT_API_URL": api,
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                    "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "DOMAINTUNE_LEASE_TTL": str(lease_ttl),
                    "DOMAINTUNE_PROJECT_DIR": str(ROOT),
                    "DOMAINTUNE_LANDING": landing,
                },
            )
        c.deployments = {d["name"]: d for d in prefect_api(api, "deployments/filter")}
        yield c
    finally:
        if c is not None:
            for name in c.hosts:
                c.stop(name)
            server = c.server  # a restarted one
        stop(server)
