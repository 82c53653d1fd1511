"""A production set-up as it runs, on one machine: a Prefect server on PostgreSQL 15, an S3 API
server (moto) holding the store and the landing zones, and two worker "hosts" (separate
``HOME``, ``PREFECT_HOME`` and local caches) with process workers in one pool. Everything
listens on 127.0.0.1 only.

What it shows: the deployments of ``deployments/prefect.yaml`` with their schedules,
data-arrival triggers and typed parameters; a worker SIGKILLed mid-training (the whole
process tree, as when its host dies) and the flow run retried on the other worker, resuming
from the last checkpoint in S3; the champion one worker promoted being what the other
worker's next run compares against; a burst of data events never running two retrains of a
use case at once; three runs started at the same moment from both hosts computing each
entry once; and a deleted local cache costing nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.cluster import production_cluster
from tests.conftest import LABELS, TINY_EVALUATION, TINY_TRAINING, make_rows, write_csv
from tests.services import prefect_api
from tests.test_concurrency import STAGES, computed_counts, summaries

CRASH_AFTER = 45.0  # seconds without a heartbeat (every 30 s, Prefect's minimum)
pytestmark = pytest.mark.slow


def _finance_config(cluster_store: dict, tiny_model: Path, source: str, **training) -> dict:
    return {
        "name": "finance-sentiment",
        "domain": "finance",
        "task": {"type": "text_classification", "labels": LABELS},
        "data": {"source": source},
        "model": {"name_or_path": str(tiny_model)},
        "training": {**TINY_TRAINING, **training},
        "evaluation": TINY_EVALUATION,
        "retries": {"count": 1, "delay_seconds": 1},
        "store": cluster_store,
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model, postgres, s3):
    with production_cluster(
        tmp_path_factory.mktemp("production"),
        postgres,
        s3,
        lambda store, source: _finance_config(store, tiny_model, source),
        crash_after=CRASH_AFTER,
        tiny_config=lambda store, source: _finance_config(store, tiny_model, source),
    ) as c:
        yield c


def test_a_worker_lost_mid_training_is_retried_on_the_other_and_resumes_from_s3_and_its_champion_is_what_the_other_worker_compares_against(
    cluster, s3, tiny_model
):
    """Point 5b and 5d. Only host A's worker runs when a run is started through the API with
    typed parameters; once a checkpoint is in S3 host A dies (its worker's whole process tree
    SIGKILLed) and host B's worker starts. The server marks the silent run Crashed, the
    automation schedules it again, host B picks it up and resumes from the newest checkpoint
    in S3, losing at most one checkpoint interval, and promotes v0001. Then host A comes back
    and B goes away: A's next run is compared against the champion that B promoted."""
    every = 20
    data = cluster.put_csv(f"s3://{cluster.bucket}/data/kill-drill.csv", make_rows(30, seed=5))
    config = _finance_config(
        cluster.store,
        tiny_model,
        data,
        max_steps=240,
        checkpoint_every_steps=every,
        logging_steps=1,
    )
    config["name"] = "kill-drill"
    cluster.start("a")
    run = cluster.create_run("finance-sentiment", config)
    fs = s3.fs()
    work = f"{cluster.bucket}/store/finetune/.work"
    deadline = time.time() + 300
    while not fs.glob(f"{work}/*/checkpoints/*/.domaintune-complete"):
        assert time.time() < deadline, cluster.worker_log("a")
        state = cluster.run_of(run["id"])["state"]["type"]
        assert state not in ("FAILED", "CRASHED", "COMPLETED"), cluster.worker_log("a")
        time.sleep(0.3)
    killed = cluster.kill("a")
    t_kill = time.time()
    assert len(killed) >= 3, "the worker, the flow run and the training processes"
    cluster.start("b")

    done = cluster.wait_final(run["id"], timeout=480)
    states = cluster.states(run["id"])
    assert done["state"]["type"] == "COMPLETED", (states, cluster.worker_log("b"))
    assert "Crashed" in states and "AwaitingRetry" in states, states
    assert done["run_count"] == 2
    recovered = time.time() - t_kill

    reg = cluster.registry("kill-drill")
    (event,) = reg["events"]
    assert event["action"] == "register" and event["promoted"] and event["flow_run_id"] == run["id"]
    lineage = json.loads(fs.cat_file(f"{reg['path']}/v0001/lineage.json"))
    first, second = lineage["model"]["attempts"]
    assert first.get("lost") and second["resumed_from"], lineage["model"]["attempts"]
    resumed_at = int(second["resumed_from"].split("-")[1])
    # the last step host A reached, from its (local) training log
    (log_a,) = cluster.hosts["a"].cache.glob("store-mirror/*/finetune/.work/*/train.log")
    reached = max(int(m) for m in re.findall(r'"step": (\d+)', log_a.read_text()))
    lost = reached - resumed_at
    assert resumed_at >= every and 0 <= lost <= every, (reached, resumed_at)
    assert lineage["model"]["global_step"] == 240
    print(f"cross-worker resume: lost {lost} steps of {every}; recovered in {recovered:.0f} s")

    # host A comes back, host B leaves: A's next run is compared against B's champion
    cluster.stop("b")
    cluster.start("a")
    config["training"] = {**config["training"], "max_steps": 16, "learning_rate": 1e-12}
    worse = cluster.create_run("finance-sentiment", config)
    done = cluster.wait_final(worse["id"], timeout=300)
    assert done["state"]["type"] == "COMPLETED", cluster.worker_log("a")
    reg = cluster.registry("kill-drill")
    assert [e["version"] for e in reg["events"]] == ["v0001", "v0002"]
    assert reg["production"] == "v0001" and not reg["events"][1]["promoted"]
    evaluation_key = json.loads(fs.cat_file(f"{reg['path']}/v0002/lineage.json"))["evaluation"][
        "key"
    ]
    metrics = json.loads(
        fs.cat_file(f"{cluster.bucket}/store/evaluate/{evaluation_key}/metrics.json")
    )
    assert metrics["champion"]["version"] == "v0001" and metrics["champion"]["metrics"]
    cluster.stop("a")


def test_the_scheduler_creates_the_weekly_runs_on_postgres(cluster):
    """Point 4: the deployments' schedules are stored in PostgreSQL and the scheduler
    creates their runs ahead of time."""
    finance = cluster.deployments["finance-sentiment"]
    assert finance["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"
    assert finance["global_concurrency_limit"]["limit"] == 1
    assert finance["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    deadline = time.time() + 90
    scheduled = []
    while time.time() < deadline and not scheduled:
        scheduled = prefect_api(
            cluster.api,
            "flow_runs/filter",
            {
                "deployments": {"id": {"any_": [finance["id"]]}},
                "flow_runs": {"state": {"name": {"any_": ["Scheduled"]}}},
            },
        )
        scheduled = [r for r in scheduled if r["created_by"] is None or r["auto_scheduled"]]
        time.sleep(2)
    assert scheduled, "no scheduled run was created"
    start = datetime.fromisoformat(scheduled[0]["expected_start_time"].replace("Z", "+00:00"))
    assert (start.weekday(), start.hour, start.minute) == (0, 3, 0)
    assert {"finance-sentiment", "healthcare-diagnosis", "ecommerce-reviews"} <= set(
        cluster.deployments
    )
    triggers = [a["trigger"] for a in prefect_api(cluster.api, "automations/filter")]
    for domain in ("finance", "healthcare", "ecommerce"):
        assert any(
            t.get("match", {}).get("prefect.resource.id") == f"domaintune.domain.{domain}"
            and t.get("expect") == ["domaintune.data.arrived"]
            for t in triggers
        ), triggers


def test_a_burst_of_data_events_runs_one_retrain_at_a_time_and_the_newest_sees_all_files(
    cluster, s3
):
    """Points 4 and 6: three files land for the finance domain in quick succession, each
    announced by `domaintune data add` (landing zone and ledger in S3). Their trigger runs
    never overlap (the deployment's concurrency limit); a queued run that a newer queued run
    supersedes ends as Superseded with the reason in its state; the last one trains on all
    three files. At most two of them train."""
    finance = cluster.deployments["finance-sentiment"]
    earlier = {r["id"] for r in cluster.runs_of(finance["id"], set())}
    cluster.start("a")
    cluster.start("b")
    files = []
    for i in range(3):
        f = write_csv(cluster.root / "incoming" / f"batch-{i}.csv", make_rows(12, seed=40 + i))
        files.append(f)
        added = cluster.run_cli(
            "a" if i % 2 == 0 else "b", "data", "add", "finance", str(f), "--json"
        )
        out, err = added.communicate(timeout=120)
        assert added.returncode == 0, err[-2000:]
        assert json.loads(out)["announced"][0]["path"].startswith(cluster.landing)
    ledger = json.loads(
        s3.fs().cat_file(f"{cluster.bucket}/landing/finance/.domaintune-announced.json")
    )
    assert len(ledger["announced"]) == 3, "each file announced once, the ledger in S3"

    deadline = time.time() + 600
    while True:
        runs = cluster.runs_of(finance["id"], earlier)
        final = [r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]
        if len(runs) == 3 and len(final) == 3:
            break
        assert time.time() < deadline, (runs, cluster.worker_log("a"), cluster.worker_log("b"))
        time.sleep(3)
    assert all(r["state"]["type"] == "COMPLETED" for r in runs), [r["state"] for r in runs]
    # one at a time: no two of them were running at the same moment
    spans = sorted(
        (datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"]))
        for r in runs
        if r["start_time"]
    )
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"two retrains of one use case overlapped: {spans}"
    superseded = [r for r in runs if r["state"]["name"] == "Superseded"]
    trained = [r for r in runs if r["state"]["name"] == "Completed"]
    assert len(trained) <= 2 and len(superseded) == 3 - len(trained)
    for r in superseded:
        assert "superseded by flow run" in r["state"]["message"]
    newest = max(runs, key=lambda r: r["created"])
    assert newest["state"]["name"] == "Completed"
    reg = cluster.registry("finance-sentiment")
    mine = [e for e in reg["events"] if e["flow_run_id"] == newest["id"]]
    version = mine[0]["version"] if mine else None
    if version is None:  # the newest found everything cached: the same model as before
        version = reg["events"][-1]["version"]
    lineage = json.loads(reg["fs"].cat_file(f"{reg['path']}/{version}/lineage.json"))
    sources = sorted(s["path"].rsplit("/", 1)[-1] for s in lineage["raw_snapshot"]["sources"])
    assert sources == ["batch-0.csv", "batch-1.csv", "batch-2.csv"], sources


def test_a_landed_file_the_champion_handles_ends_skipped_through_the_data_trigger(cluster):
    """Issue 31: the e-commerce deployment (retrain.when: degraded_or_drifted in
    deployments/prefect.yaml) is started by its data-arrival trigger for each file that
    `domaintune data add` lands: the first trains the champion; the second, like the first,
    is scored by the champion before anything trains, holds, and the run ends Completed,
    named Skipped, with the champion's figures in its message, as the UI and API show it."""
    dep = cluster.deployments["ecommerce-reviews"]
    earlier = {r["id"] for r in cluster.runs_of(dep["id"], set())}
    cluster.start("a")
    finished: list[dict] = []
    for i in range(2):
        f = write_csv(cluster.root / "incoming" / f"reviews-{i}.csv", make_rows(30, seed=60 + i))
        added = cluster.run_cli("a", "data", "add", "ecommerce", str(f), "--json")
        out, err = added.communicate(timeout=120)
        assert added.returncode == 0, err[-2000:]
        deadline = time.time() + 600
        while True:
            runs = cluster.runs_of(dep["id"], earlier | {r["id"] for r in finished})
            done = [r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]
            if done:
                finished.append(done[0])
                break
            assert time.time() < deadline, (runs, cluster.worker_log("a"))
            time.sleep(3)
    first, second = finished
    assert first["state"]["name"] == "Completed", first["state"]
    assert second["state"]["type"] == "COMPLETED" and second["state"]["name"] == "Skipped"
    message = second["state"]["message"]
    assert "champion v0001 holds on reviews-1.csv" in message and "registered" in message
    reg = cluster.registry("ecommerce-reviews")
    assert [e["version"] for e in reg["events"] if e["action"] == "register"] == ["v0001"]


def test_three_runs_from_two_hosts_at_once_compute_each_entry_once_and_a_cache_is_disposable(
    cluster, s3, tiny_model
):
    """Points 5a and 5c: `domaintune run` started at the same moment twice on host A and once
    on host B (each its own process, reporting to the Postgres-backed server): every entry is
    computed once in all, one version is registered, the log and the pointers agree. Then
    host A's whole cache is deleted and the same run recomputes nothing."""
    data = cluster.put_csv(f"s3://{cluster.bucket}/data/together.csv", make_rows(30, seed=9))
    config = _finance_config(cluster.store, tiny_model, data)
    config["name"] = "together"
    path = cluster.root / "together.yaml"
    path.write_text(yaml.safe_dump(config))
    docs = summaries([cluster.run_cli(h, "run", str(path), "--json") for h in ("a", "a", "b")])
    assert computed_counts(docs) == dict.fromkeys(STAGES, 1), "each entry computed once"
    assert {d["version"] for d in docs} == {"v0001"}
    reg = cluster.registry("together")
    assert [(e["action"], e["version"]) for e in reg["events"]] == [("register", "v0001")]
    assert reg["production"] == "v0001"
    assert reg["fs"].cat_file(f"{reg['path']}/latest") == b"v0001"
    assert {d["model_dir"] for d in docs} == {
        f"{cluster.store['root']}/registry/together/v0001/model"
    }
    assert not reg["fs"].glob(f"{cluster.bucket}/store/**/.tmp-*")
    runs = {d["run_id"] for d in docs}
    assert len(runs) == 3 and all(cluster.run_of(r)["state"]["type"] == "COMPLETED" for r in runs)

    shutil.rmtree(cluster.hosts["a"].cache)
    again = cluster.run_cli("a", "run", str(path), "--json")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    doc = json.loads(out)
    assert all(s["cached"] for s in doc["stages"]), doc["stages"]
    assert doc["version"] == "v0001"


@pytest.mark.browser
def test_a_custom_run_from_the_ui_uses_the_changed_parameter(cluster, s3):
    """Headless Chromium opens the Prefect UI of the Postgres-backed server, starts a custom
    run of the finance deployment with training.epochs changed in the parameter form, and a
    worker runs it to completion with that value."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make install adds it with apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api")
    cluster.put_csv(f"{cluster.landing}/finance/ui.csv", make_rows(30, seed=11))
    cluster.start("b")
    api = cluster.api
    ui = api[: -len("/api")]
    finance = cluster.deployments["finance-sentiment"]
    earlier = {r["id"] for r in cluster.runs_of(finance["id"], set())}
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
            deadline = time.time() + 300
            while not (runs := cluster.runs_of(finance["id"], earlier)):
                assert time.time() < deadline
                time.sleep(1)
            (run,) = runs
            done = cluster.wait_final(run["id"], timeout=300)
            assert done["state"]["type"] == "COMPLETED", cluster.worker_log("b")
            assert done["parameters"]["config"]["training"]["epochs"] == 2
            page.goto(f"{ui}/runs/flow-run/{run['id']}", wait_until="networkidle")
            page.get_by_text("Completed").first.wait_for(timeout=30_000)
        finally:
            browser.close()
    reg = cluster.registry("finance-sentiment")
    (event,) = [e for e in reg["events"] if e["flow_run_id"] == run["id"]]
    config = yaml.safe_load(reg["fs"].cat_file(f"{reg['path']}/{event['version']}/config.yaml"))
    assert config["training"]["epochs"] == 2


def test_no_secret_reaches_any_output_of_the_cluster(cluster, s3, postgres):
    """After all of the above: the S3 secret key (in every worker's environment) and the
    database password (in the server's) are in no log file, no Prefect log line or
    artifact, and no text object of the store."""
    secrets = {"S3 secret key": s3.secret, "database password": postgres.password}
    texts: dict[str, str] = {}
    for p in cluster.root.rglob("*"):
        if p.is_file() and p.suffix in (".log", ".json", ".yaml", ".md", ".txt", ".csv"):
            texts[str(p)] = p.read_text(errors="replace")
    logs = prefect_api(cluster.api, "logs/filter", {"limit": 200})
    offset = 200
    while len(logs) == offset:  # every log line of every run
        more = prefect_api(cluster.api, "logs/filter", {"limit": 200, "offset": offset})
        logs += more
        offset += 200
    texts["prefect logs"] = "\n".join(line["message"] for line in logs)
    artifacts = prefect_api(cluster.api, "artifacts/filter", {"limit": 200})
    texts["prefect artifacts"] = json.dumps(artifacts)
    fs = s3.fs()
    for path in fs.find(f"{cluster.bucket}/store"):
        if path.endswith((".json", ".yaml", ".md", ".log", ".jsonl")) or "/log/" in path:
            texts[path] = fs.cat_file(path).decode(errors="replace")
    assert len(texts) > 50 and len(logs) > 100
    for what, secret in secrets.items():
        leaked = [where for where, text in texts.items() if secret in text]
        assert not leaked, f"the {what} appears in {leaked[:5]}"


def test_the_prefect_server_and_postgresql_restarting_under_a_run_leave_one_completed_run_and_one_version(
    cluster, s3, postgres, tiny_model
):
    """Issue 33, points 1 and 2: while a deployment run trains on host A, the Prefect API
    server is stopped and started again on the same database (a restart during a deploy),
    then PostgreSQL itself (a failover as clients see it: connections cut, the server gone
    for seconds). The run ends Completed (retried by the automation if it had to be), its
    stages are in the API, one version is registered, and no lease or temporary object is
    left in the store."""
    data = cluster.put_csv(f"s3://{cluster.bucket}/data/restarts.csv", make_rows(30, seed=11))
    config = _finance_config(
        cluster.store, tiny_model, data, max_steps=360, checkpoint_every_steps=30, logging_steps=5
    )
    config["name"] = "restarts"
    cluster.start("a")
    run = cluster.create_run("finance-sentiment", config)
    fs = s3.fs()
    work = f"{cluster.bucket}/store/finetune/.work"

    def checkpoints() -> int:
        fs.invalidate_cache()
        return len(fs.glob(f"{work}/*/checkpoints/*/.domaintune-complete"))

    deadline = time.time() + 300
    while checkpoints() < 1:
        assert time.time() < deadline, cluster.worker_log("a")
        time.sleep(0.5)
    t0 = time.time()
    cluster.restart_server(down=5.0)
    before = checkpoints()
    while checkpoints() == before:  # training went on through the restart
        assert time.time() < deadline + 120, cluster.worker_log("a")
        time.sleep(0.5)
    postgres.restart(down=3.0)
    faults_done = time.time()
    assert cluster.run_of(run["id"])["state"]["type"] == "RUNNING", "still training at the faults"

    done = cluster.wait_final(run["id"], timeout=480)
    states = cluster.states(run["id"])
    assert done["state"]["type"] == "COMPLETED", (states, cluster.worker_log("a"))
    tasks = prefect_api(
        cluster.api, "task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}
    )
    final = {}  # a stage's last task run (a retried stage has more than one)
    for t in sorted(tasks, key=lambda t: t["expected_start_time"] or ""):
        final[t["name"].rsplit("-", 1)[0]] = t["state"]["type"]
    assert {"ingest", "validate", "preprocess", "finetune", "evaluate", "register"} <= set(final)
    assert final["finetune"] == "COMPLETED" and final["register"] == "COMPLETED", final
    reg = cluster.registry("restarts")
    assert [(e["action"], e["version"]) for e in reg["events"]] == [("register", "v0001")]
    assert not fs.glob(f"{cluster.bucket}/store/**/.tmp-*")
    leases = [p for p in fs.find(f"{cluster.bucket}/store") if "/.locks/" in p]
    held = [p for p in leases if not json.loads(fs.cat_file(p)).get("released")]
    assert not held, held
    print(
        f"restarts: server down 5 s and PostgreSQL down 3 s during training; "
        f"{done['run_count']} run attempt(s); completed {time.time() - t0:.0f} s after the "
        f"first fault ({time.time() - faults_done:.0f} s after the last)"
    )
