"""Retraining that knows when: the champion scored on each landed file, drift, the policy,
the degraded event read back from the Prefect API, and continual training from the champion.
Real flow, real temporary Prefect server, real tiny models."""

from __future__ import annotations

import json
import time

import pytest

from domaintune.monitoring import DEGRADED_EVENT, HealthLog
from domaintune.storage.store import Store
from tests.conftest import make_rows, write_csv

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

FLIP = {"positive": "negative", "negative": "positive", "neutral": "neutral"}


def stage_names(summary: dict) -> list[str]:
    return [s["name"] for s in summary["stages"]]


def read_events(prefix: str, timeout: float = 30.0) -> list[dict]:
    """Events from the Prefect server's API (they are persisted asynchronously)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = f"{PREFECT_API_URL.value().rstrip('/')}/events/filter"
    deadline = time.monotonic() + timeout
    while True:
        body = {"filter": {"event": {"prefix": [prefix]}}, "limit": 50}
        events = httpx.post(url, json=body, timeout=10).json().get("events", [])
        if events or time.monotonic() > deadline:
            return events
        time.sleep(1)


def test_champion_health_decides_whether_a_landed_file_retrains(tmp_path, make_config):
    from domaintune.flows.retrain import retrain

    landing = tmp_path / "landing" / "finance"
    write_csv(landing / "2026-12-01.csv", make_rows(40, seed=0))
    cfg = make_config(str(landing / "*.csv"), retrain={"when": "degraded_or_drifted"})

    first = retrain(cfg)
    assert "monitor" in stage_names(first) and first["promoted"], first["promotion_reason"]

    # a file like the first: the champion holds, nothing drifted, nothing trains
    write_csv(landing / "2026-12-02.csv", make_rows(40, seed=1))
    state = retrain(cfg, return_state=True)
    assert state.is_completed() and state.name == "Skipped", (state.name, state.message)
    assert "skipped" in state.message and "champion v0001 holds on 2026-12-02.csv" in state.message
    assert "accuracy" in state.message and "no drift" in state.message, state.message
    summary = state.result()
    assert summary["status"] == "skipped" and "finetune" not in stage_names(summary)
    store = Store.of(cfg)
    (record,) = HealthLog(store, cfg.name).records()
    assert record["version"] == "v0001" and record["decision"] == "skipped"
    assert record["low"] <= record["value"] <= record["high"] and not record["degraded"]

    # the same data again: the monitor stage is Cached, no second record
    again = retrain(cfg, return_state=True)
    assert again.name == "Skipped"
    assert {s["name"]: s["cached"] for s in again.result()["stages"]}["monitor"]
    assert len(HealthLog(store, cfg.name).records()) == 1

    # a shifted file: no neutral rows (the label mix drifts) and positive / negative swapped
    # (the champion is significantly worse there): a retrain starts, the degraded event
    # reaches the Prefect API
    shifted = [
        {**r, "label": FLIP[r["label"]]}
        for r in make_rows(40, seed=2, labels=["negative", "positive"])
    ]
    write_csv(landing / "2026-12-03.csv", shifted)
    third = retrain(cfg)
    assert "finetune" in stage_names(third) and third["version"] == "v0002"
    health = third["metrics"]["health"]
    assert health["degraded"] and health["drifted"] and "drift in labels" in health["message"]
    records = HealthLog(store, cfg.name).records()
    assert len(records) == 2 and records[-1]["degraded"] and records[-1]["decision"] == "train"
    assert records[-1]["high"] < records[-1]["registered"], records[-1]
    v2 = store.local_path("registry", cfg.name, "v0002")
    card = (v2 / "model" / "README.md").read_text()
    assert "## Why it was trained: the new data" in card and "| labels |" in card
    assert json.loads((v2 / "lineage.json").read_text())["monitor"]["degraded"] is True
    from tests.flows.test_retrain import run_artifacts

    described = {a.description for a in run_artifacts(third["run_id"])}
    assert {"Champion health on new data", "Champion health history"} <= described
    events = read_events(DEGRADED_EVENT)
    assert events, "no domaintune.model.degraded event on the server"
    event = events[0]
    assert event["resource"]["prefect.resource.id"] == "domaintune.model.test-uc"
    assert event["payload"]["version"] == "v0001" and event["payload"]["files"][0].endswith(
        "2026-12-03.csv"
    )

    # domaintune models health prints the history
    import contextlib
    import io

    from domaintune.cli import main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["models", "health", cfg.name, "--store", cfg.store.root, "--json"]) == 0
    history = json.loads(out.getvalue())
    assert [r["decision"] for r in history] == ["skipped", "train"]


def test_continual_training_from_the_champion_with_replay_and_its_forgetting_guard(
    tmp_path, make_config
):
    """retrain.start_from: champion. A file like the first: the challenger continues from
    v0001 on its rows plus a replay share of earlier rows, compared with its champion on the
    champion's own test rows and on the new rows. Then a feed that labels every text neutral,
    without replay: the challenger learns it, so it is better overall (most test rows are
    new) and on the new rows, but much worse on the champion's own test rows: the forgetting
    guard refuses it."""
    from domaintune.flows.retrain import retrain

    landing = tmp_path / "landing"
    write_csv(landing / "a.csv", make_rows(30, seed=0))
    cfg = make_config(
        str(landing / "*.csv"),
        retrain={"start_from": "champion", "replay_share": 0.25},
    )
    first = retrain(cfg)
    assert first["version"] == "v0001" and first["promoted"]

    write_csv(landing / "b.csv", make_rows(20, seed=3))
    second = retrain(cfg)
    assert "preprocess-continual" in stage_names(second)
    registry = Store.of(cfg).local_path("registry", cfg.name)
    lineage = json.loads((registry / "v0002" / "lineage.json").read_text())
    assert lineage["base_model"]["registry"]["version"] == "v0001", lineage["base_model"]
    data = lineage["training_data"]
    assert data["start_from"] == "champion" and data["train_rows_new"] > 0
    share = data["train_rows_replay"] / (data["train_rows_replay"] + data["train_rows_new"])
    assert abs(share - 0.25) < 0.1, data
    reg = json.loads((registry / "v0002" / "registration.json").read_text())
    assert reg["evidence"]["earlier"] and reg["evidence"]["new"], reg["evidence"]
    champion = "v0002" if second["promoted"] else "v0001"

    write_csv(landing / "c.csv", [{**r, "label": "neutral"} for r in make_rows(90, seed=4)])
    third = retrain(
        cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"replay_share": 0.0})})
    )
    assert not third["promoted"], third["promotion_reason"]
    assert third["promotion_reason"].startswith(f"forgetting: trained from champion {champion}")
    reg = json.loads((registry / third["version"] / "registration.json").read_text())
    earlier, new = reg["evidence"]["earlier"], reg["evidence"]["new"]
    assert earlier["difference"] < -0.02 and new["difference"] > 0, reg["evidence"]
