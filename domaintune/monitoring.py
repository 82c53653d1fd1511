"""The champion's health on new data, its history, and the retrain decision.

When labelled files land for a use case, the ``monitor`` stage (tasks/monitor.py) scores the
production version on the files it was not trained on, with a bootstrap interval, measures
how far the new data has drifted from its training data (domaintune.drift), and decides by
``retrain.when`` whether this run trains. This module holds what does not need a model:

- :class:`HealthLog`: the history of those measurements, ``<store>/health/<name>/NNNNNN.json``
  in the store itself (each record written once, create-if-absent, as the registry's log),
  so every host and ``domaintune models health NAME`` read the same history;
- :func:`decide`: the policy;
- :func:`emit_degraded`: the Prefect event ``domaintune.model.degraded`` (resource
  ``domaintune.model.<name>``), for a Prefect automation (a notification) to hang on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from domaintune.errors import StoreError
from domaintune.storage.coordination import create_exclusive, numbered_objects
from domaintune.storage.store import Store

log = logging.getLogger(__name__)

DEGRADED_EVENT = "domaintune.model.degraded"
HEALTH = "health"


def model_resource_id(name: str) -> str:
    return f"domaintune.model.{name}"


class HealthLog:
    """``health/<name>/`` of a store: one JSON record per measurement, oldest first."""

    def __init__(self, store: Store, name: str):
        self.store = store
        self.fs = store.fs
        self.path = store.remote_path(HEALTH, name)
        self.url = store.url_of(HEALTH, name)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for n in numbered_objects(self.fs, self.path):
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                out.append(json.loads(self.fs.cat_file(f"{self.path}/{n:06d}.json")))
        return out

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write ``record`` as the next number (retrying past a number another host took)."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
        data = json.dumps(record, indent=2).encode()
        for _ in range(20):
            numbers = numbered_objects(self.fs, self.path)
            nxt = (numbers[-1] + 1) if numbers else 1
            try:
                create_exclusive(self.fs, f"{self.path}/{nxt:06d}.json", data)
                return record
            except FileExistsError:
                continue
        raise StoreError(f"health log {self.url}: could not append a record (20 tries)")


def decide(when: str, degraded: bool | None, drifted: bool | None) -> tuple[bool, str]:
    """(train?, the rule that decided) for ``retrain.when``; ``None``: not measured (no
    champion, no new file, or the champion cannot be scored): then the run trains."""
    if when == "always":
        return True, "retrain.when: always"
    if degraded is None and drifted is None:
        return True, "nothing measured"
    wants = {
        "degraded": bool(degraded),
        "drifted": bool(drifted),
        "degraded_or_drifted": bool(degraded) or bool(drifted),
    }[when]
    if wants:
        return True, f"retrain.when: {when}"
    return False, f"retrain.when: {when}"


def emit_degraded(name: str, domain: str, record: dict[str, Any]) -> Any:
    """Emit ``domaintune.model.degraded`` for the use case (None without a Prefect API)."""
    from prefect.events import emit_event

    event = emit_event(
        event=DEGRADED_EVENT,
        resource={
            "prefect.resource.id": model_resource_id(name),
            "prefect.resource.name": name,
            "domaintune.domain": domain,
        },
        payload={
            k: record.get(k)
            for k in (
                "version",
                "primary_metric",
                "value",
                "low",
                "high",
                "registered",
                "files",
                "rows",
                "message",
            )
        },
    )
    log.warning("monitor: %s for %s: %s", DEGRADED_EVENT, name, record.get("message"))
    return event


def history_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per record, for ``models health`` and the Prefect table artifact."""
    rows = []
    for r in records:
        rows.append(
            {
                "time": r.get("time"),
                "version": r.get("version"),
                "files": ", ".join(f.rsplit("/", 1)[-1] for f in r.get("files", [])),
                "rows": r.get("rows"),
                "metric": r.get("primary_metric"),
                "value": r.get("value"),
                "interval": (
                    f"[{r['low']:.4f}, {r['high']:.4f}]"
                    if r.get("low") is not None and r.get("high") is not None
                    else ""
                ),
                "registered": r.get("registered"),
                "degraded": r.get("degraded"),
                "drifted": r.get("drifted"),
                "decision": r.get("decision"),
            }
        )
    return rows
