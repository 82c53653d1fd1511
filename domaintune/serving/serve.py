"""``domaintune serve``: everything needed to operate domaintune on one machine.

1. A Prefect server on 127.0.0.1, unless ``PREFECT_API_URL`` already points at one (a shared
   server): then that one is used unchanged. Its database is PostgreSQL when
   ``--database-url`` or ``PREFECT_API_DATABASE_CONNECTION_URL`` names one (checked before the
   server starts: a bad URL, a refused password or an unreachable host is one line, without
   the password), else SQLite under ``PREFECT_HOME``.
2. The process work pool (created when missing), the deployments of
   ``deployments/prefect.yaml`` (schedules, data-arrival triggers, a concurrency limit of one
   run per deployment) and the automations that retry a run whose worker died
   (``domaintune.automations``).
3. ``--workers`` process workers for the pool (default 1), sending flow-run heartbeats.
4. The landing watcher (``domaintune watch``) in this process.

Ctrl-C stops what it started. Logs of the server and the worker go to ``.domaintune-serve/``.
"""

from __future__ import annotations

import argparse
import contextlib
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
from domaintune.redaction import redact

log = logging.getLogger(__name__)

DATABASE_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


class DatabaseError(Exception):
    """The Prefect server's database cannot be used: one line, no password."""


def database_url(arg: str | None, env: dict[str, str]) -> str | None:
    """The database URL from ``--database-url`` (``${env:NAME}`` read from ``env``) or
    ``PREFECT_API_DATABASE_CONNECTION_URL``; None for Prefect's SQLite default."""
    from domaintune.credentials import ENV_REF
    from domaintune.redaction import register_secret

    url = arg or env.get(DATABASE_ENV) or None
    if url:
        m = ENV_REF.fullmatch(url.strip())
        if m:
            if m.group(1) not in env:
                raise DatabaseError(
                    f"--database-url {url}: environment variable {m.group(1)} is not set"
                )
            url = env[m.group(1)]
        with contextlib.suppress(Exception):
            from sqlalchemy.engine import make_url

            if make_url(url).password:
                register_secret(str(make_url(url).password))
    return url


def describe_database(url: str) -> str:
    """The URL as it may be shown: without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return redact(url)


def check_database(url: str, timeout: float = 10.0) -> None:
    """Connect once to a PostgreSQL database URL; ``DatabaseError`` naming what failed."""
    import asyncio

    from sqlalchemy.engine import make_url

    shown = describe_database(url)
    try:
        u = make_url(url)
    except Exception as exc:
        raise DatabaseError(f"database URL {redact(url)}: not a URL ({exc})") from None
    if not u.drivername.startswith("postgresql"):
        if u.drivername.startswith("sqlite"):
            return
        raise DatabaseError(
            f"database {shown}: rule: Prefect's server runs on PostgreSQL "
            "(postgresql+asyncpg://...) or SQLite"
        )

    async def connect() -> None:
        import asyncpg

        conn = await asyncpg.connect(
            host=u.host or "127.0.0.1",
            port=u.port or 5432,
            user=u.username,
            password=u.password,
            database=u.database,
            timeout=timeout,
        )
        await conn.close()

    try:
        asyncio.run(connect())
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatabaseError(f"database {shown}: cannot connect: {redact(reason)}") from None


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


def ensure_automations(env: dict[str, str], crash_after: float, retries: int = 2) -> None:
    """The automations that mark a run without heartbeats Crashed and retry it on any
    worker (``domaintune.automations``), on the server of ``env``'s PREFECT_API_URL."""
    result = subprocess.run(
        [sys.executable, "-m", "domaintune.automations", "--crash-after", str(crash_after),
         "--retries", str(retries)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"creating the automations failed:\n{result.stderr[-3000:]}")


def start_worker(
    pool: str, log_dir: Path, env: dict[str, str], name: str | None = None
) -> subprocess.Popen:
    """A process worker for ``pool``. Its flow runs send a heartbeat every 30 s unless the
    environment says otherwise (what the crash automation watches)."""
    from domaintune.automations import HEARTBEAT_SECONDS

    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / f"{name or 'worker'}.log", "a")  # noqa: SIM115
    args = ["worker", "start", "--pool", pool, "--type", "process"]
    if name:
        args += ["--name", name]
    return subprocess.Popen(
        _prefect(*args),
        env={HEARTBEAT_ENV: str(HEARTBEAT_SECONDS), **env},
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
        db = None
        started = not api
        if not api:
            db = database_url(getattr(args, "database_url", None), env)
            if db:
                check_database(db)
                env[DATABASE_ENV] = db
            port = args.port if _port_free(args.port) else free_port()
            server, api = start_server(port, log_dir, env, args.host)
            procs.append(server)
        else:
            if getattr(args, "database_url", None):
                raise DatabaseError(
                    "--database-url: PREFECT_API_URL points at a running server, which has "
                    "its own database; unset one of them"
                )
            wait_healthy(api, timeout=30)
        env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"] = api
        deploy(args.prefect_file, args.pool, env)
        from domaintune.automations import HEARTBEAT_SECONDS

        heartbeat = float(env.get(HEARTBEAT_ENV, HEARTBEAT_SECONDS))
        crash_after = getattr(args, "crash_after", None) or 3 * heartbeat
        ensure_automations(env, crash_after)
        for i in range(getattr(args, "workers", 1)):
            procs.append(start_worker(args.pool, log_dir, env, name=f"worker-{i + 1}"))
        ui = api[: -len("/api")] if api.endswith("/api") else api
        info = {
            "ui": ui,
            "api": api,
            "database": describe_database(db)
            if db
            else ("sqlite (PREFECT_HOME)" if started else "that of the server at the API URL"),
            "work_pool": args.pool,
            "workers": getattr(args, "workers", 1),
            "crash_after_seconds": crash_after,
            "landing": str(landing_root(args.landing)),
            "logs": str(log_dir),
        }
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"domaintune: Prefect UI at {ui}", flush=True)
            print(f"  database: {info['database']}")
            print(
                f"  deployments from {args.prefect_file}; {info['workers']} worker(s) on pool "
                f"{args.pool!r}; a run silent for {crash_after:.0f} s is retried on any worker"
            )
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
    except DatabaseError as exc:
        print(f"domaintune serve: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 2
    finally:
        _stop(procs)
    return 0
