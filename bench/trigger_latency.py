"""Seconds from a file landing to its flow run starting, with the default settings.

    python bench/trigger_latency.py [--repeats 3]

Starts what `domaintune serve` starts (a Prefect server on a free port with SQLite in a
temporary PREFECT_HOME, the deployments of deployments/prefect.yaml, a process worker) plus
`domaintune watch` as its own process, then drops a complete CSV into landing/finance/ by
an atomic rename and times: the watcher's event, the automation's flow run, and the run
leaving Scheduled/Pending (the worker started it). Goal: under 15 s. The runs it starts are
cancelled; nothing is trained to completion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _api(api: str, path: str, body: dict | None = None, method: str = "POST"):
    req = urllib.request.Request(
        f"{api}/{path}",
        data=json.dumps(body or {}).encode() if method == "POST" else None,
        headers={"Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def _ts(text: str | None) -> float | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from domaintune.serving.serve import deploy, free_port, start_server, start_worker

    tmp = Path(tempfile.mkdtemp(prefix="bench-trigger-"))
    landing = tmp / "landing"
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"),
        DOMAINTUNE_PROJECT_DIR=str(ROOT),
        DOMAINTUNE_LANDING=str(landing),
        HF_HUB_OFFLINE="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    procs = []
    rows = []
    try:
        t0 = time.perf_counter()
        server, api = start_server(free_port(), tmp / "logs", env)
        procs.append(server)
        env["PREFECT_API_URL"] = api
        print(f"server up in {time.perf_counter() - t0:.1f} s at {api}", flush=True)
        deploy(str(ROOT / "deployments" / "prefect.yaml"), "domaintune", env, cwd=ROOT)
        finance = next(
            d for d in _api(api, "deployments/filter") if d["name"] == "finance-sentiment"
        )
        procs.append(start_worker("domaintune", tmp / "logs", env))
        watcher_log = open(tmp / "logs" / "watch.log", "a")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "domaintune.cli", "watch", "-v"],
                env=env,
                stdout=watcher_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )
        )
        time.sleep(5)  # let the worker and watcher settle in
        seen: set[str] = set()
        for i in range(args.repeats):
            src = tmp / f"batch-{i}.csv"
            src.write_text(
                "label,news\n"
                + "".join(
                    f"neutral,Batch {i} sentence {j} about quarterly results.\n" for j in range(40)
                )
            )
            dest = landing / "finance" / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest.with_suffix(".part"))
            landed = time.time()
            os.replace(dest.with_suffix(".part"), dest)  # complete at this instant
            run = None
            while time.time() - landed < 120:
                runs = _api(
                    api,
                    "flow_runs/filter",
                    {"deployments": {"id": {"any_": [finance["id"]]}}},
                )
                fresh = [r for r in runs if r["id"] not in seen and _ts(r["created"]) >= landed - 1]
                started = [r for r in fresh if r.get("start_time")]
                if started:
                    run = started[0]
                    break
                time.sleep(0.25)
            if run is None:
                print(f"repeat {i}: no run started within 120 s", flush=True)
                continue
            seen.add(run["id"])
            created, started_at = _ts(run["created"]), _ts(run["start_time"])
            rows.append(
                {
                    "repeat": i,
                    "land_to_run_created_s": round(created - landed, 2),
                    "land_to_run_started_s": round((started_at or time.time()) - landed, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            _api(
                api,
                f"flow_runs/{run['id']}/set_state",
                {"state": {"type": "CANCELLING"}, "force": True},
            )
            time.sleep(3)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    if rows:
        started = [r["land_to_run_started_s"] for r in rows]
        print(
            json.dumps(
                {
                    "repeats": len(rows),
                    "median_land_to_run_started_s": statistics.median(started),
                    "max_land_to_run_started_s": max(started),
                    "median_land_to_run_created_s": statistics.median(
                        r["land_to_run_created_s"] for r in rows
                    ),
                    "goal_s": 15,
                    "settings": "watch interval 2 s, settle 2 s, worker poll 10 s (defaults)",
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
