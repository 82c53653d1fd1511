"""``domaintune serve``: everything needed to operate domaintune on one machine.

1. A Prefect server on 127.0.0.1 (SQLite under ``PREFECT_HOME``), unless ``PREFECT_API_URL``
   already points at one (for example a shared server with Postgres behind it): then that
   one is used unchanged.
2. The process work pool (created when missing) and the deployments of
   ``deployments/prefect.yaml`` (schedules and data-arrival triggers included).
3. A process worker for the pool.
4. The landing watcher (``domaintune watch``) in this process.

Ctrl-C stops what it started. Logs of the server and the worker go to ``.domaintune-serve/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from domaintune.landing import landing_root, watch

log = logging.getLogger(__name__)


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server at {api_url} did not answer within {timeout:.0f} s")


def start_server(
    port: int, log_dir: Path, env: dict[str, str], host: str = "127.0.0.1"
) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` on ``host`` (loopback unless told otherwise: the Prefect API
    has no authentication of its own)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "server.log", "a")  # noqa: SIM115 - lives as long as the server
    if host != "127.0.0.1":
        log.warning(
            "the Prefect server listens on %s: its API has no authentication, so whoever "
            "reaches port %d can start runs and read their parameters (put it behind a proxy "
            "that authenticates)",
            host,
            port,
        )
    connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    api = f"http://{connect}:{port}/api"
    # the UI in the browser must call this server, not the default port 4200
    server_env = {**env, "PREFECT_UI_API_URL": api, "PREFECT_SERVER_API_PORT": str(port)}
    proc = subprocess.Popen(
        _prefect("server", "start", "--host", host, "--port", str(port)),
        env=server_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_healthy(api)
    return proc, api


def deploy(
    prefect_file: str, pool: str, env: dict[str, str], cwd: str | os.PathLike | None = None
) -> None:
    """Create the work pool when missing, then register every deployment of the file
    (entrypoints are relative to ``cwd``, the project root)."""
    exists = subprocess.run(
        _prefect("work-pool", "inspect", pool), env=env, capture_output=True, text=True, cwd=cwd
    )
    if exists.returncode != 0:
        subprocess.run(
            _prefect("work-pool", "create", pool, "--type", "process"),
            env=env,
            check=True,
            capture_output=True,
            text=True,
            cwd=cwd,
        )
    result = subprocess.run(
        _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)),
        env=env,
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"prefect deploy failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )


def start_worker(pool: str, log_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    out = open(log_dir / "worker.log", "a")  # noqa: SIM115
    return subprocess.Popen(
        _prefect("worker", "start", "--pool", pool, "--type", "process"),
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def serve(args: argparse.Namespace) -> int:
    project = Path.cwd()
    log_dir = project / ".domaintune-serve"
    env = dict(os.environ)
    env.setdefault("DOMAINTUNE_PROJECT_DIR", str(project))
    procs: list[subprocess.Popen] = []

    def _terminate(signum, frame):  # `kill` and service managers: stop like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        api = env.get("PREFECT_API_URL")
        if not api:
            port = args.port if _port_free(args.port) else free_port()
            server, api = start_server(port, log_dir, env, args.host)
            procs.append(server)
        else:
            wait_healthy(api, timeout=30)
        env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"] = api
        deploy(args.prefect_file, args.pool, env)
        procs.append(start_worker(args.pool, log_dir, env))
        ui = api[: -len("/api")] if api.endswith("/api") else api
        info = {
            "ui": ui,
            "api": api,
            "work_pool": args.pool,
            "landing": str(landing_root(args.landing)),
            "logs": str(log_dir),
        }
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"domaintune: Prefect UI at {ui}", flush=True)
            print(f"  deployments from {args.prefect_file}; worker on pool {args.pool!r}")
            print(
                f"  landing zones: {info['landing']}/<domain>/ (watched)"
                if not args.no_watch
                else ""
            )
            print("  Ctrl-C stops everything started here", flush=True)
        stop = threading.Event()
        if args.no_watch:
            while all(p.poll() is None for p in procs):
                time.sleep(1)
        else:
            watch(landing_root(args.landing), stop=stop)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(procs)
    return 0
