"""Orchestration overhead: the retrain flow vs the same stage functions called directly.

Both run in this one process on the same work (same config, each on a fresh store, so
nothing is cached), and both launch training through DeepSpeed the same way; the difference
is what Prefect adds (its temporary local server, task runs, state tracking, artifacts).

    python bench/overhead.py                      # the demo config, full training
    python bench/overhead.py --set training.max_steps=20   # quicker, a harsher ratio

Prints wall seconds for each and the ratio flow / direct (goal: at most 1.10), with and
without the one-off start of Prefect's temporary server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "bbc_news.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
    from domaintune.environment import configure_environment

    configure_environment()
    logging.basicConfig(level=logging.WARNING)
    from domaintune.runconfig import load_config
    from domaintune.storage.store import Store
    from domaintune.tasks.evaluate import evaluate
    from domaintune.tasks.finetune import finetune
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.preprocess import preprocess
    from domaintune.tasks.register import register
    from domaintune.tasks.validate import validate

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))

    def config_for(label: str):
        return load_config(args.config, [*args.overrides, f"store.root={work / label}"])

    # direct: the stage functions, one after another, no Prefect at all
    cfg = config_for("direct")
    t0 = time.perf_counter()
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    validate(cfg, raw, store)
    splits = preprocess(cfg, raw, store)
    model = finetune(cfg, splits, store)
    evaluation = evaluate(cfg, splits, model, store)
    register(cfg, raw, splits, model, evaluation, store)
    direct = time.perf_counter() - t0

    # the flow: Prefect's temporary local server starts on the first flow call
    from prefect import flow

    from domaintune.flows.retrain import retrain

    @flow(name="bench-warmup")
    def warmup() -> int:
        return 1

    t0 = time.perf_counter()
    warmup()
    server_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = retrain(config_for("flow"))
    flow_time = time.perf_counter() - t0
    assert not any(s["cached"] for s in summary["stages"]), "the flow run must do the same work"

    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "config": args.config,
        "overrides": args.overrides,
        "direct_seconds": round(direct, 2),
        "flow_seconds": round(flow_time, 2),
        "prefect_server_start_seconds": round(server_start, 2),
        "ratio_flow_over_direct": round(flow_time / direct, 3),
        "ratio_including_server_start": round((flow_time + server_start) / direct, 3),
        "goal": "ratio <= 1.10",
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
