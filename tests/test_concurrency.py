"""Three runs of the same config at once on the same store (three workers picking up the
same schedule): all complete, every intermediate is computed once (the others wait on its
lock and reuse it), one model version is registered, and nothing is left half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_csv
from tests.test_cli import write_config


def launch_runs(config: str | Path, home: Path, n: int, stderr=subprocess.PIPE) -> list:
    """``n`` `domaintune run` processes of one config at once, each with its own Prefect
    home and no configured API (so each starts its own local server: separate workers)."""
    procs = []
    for i in range(n):
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_HOME"] = str(home / f"prefect-{i}")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "domaintune.cli", "run", str(config), "--json"],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        )
    return procs


STAGES = ("ingest", "validate", "preprocess", "finetune", "evaluate")


def computed_counts(docs: list[dict]) -> dict[str, int]:
    """How many of the runs' summaries computed each stage (the others reused it)."""
    return {
        stage: sum(not next(s for s in d["stages"] if s["name"] == stage)["cached"] for d in docs)
        for stage in STAGES
    }


def summaries(procs: list, timeout: float = 900) -> list[dict]:
    """The JSON summaries of `domaintune run --json` processes, each of which must succeed."""
    docs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        docs.append(json.loads(out))
    return docs


@pytest.mark.slow
def test_three_concurrent_runs_compute_each_intermediate_once(tmp_path, rows, make_config):
    src = write_csv(tmp_path / "d.csv", rows(30))
    cfg = make_config(src)
    config = write_config(tmp_path / "c.yaml", cfg)
    docs = summaries(launch_runs(config, tmp_path, 3))

    assert computed_counts(docs) == dict.fromkeys(STAGES, 1), "each entry computed once"
    assert {d["version"] for d in docs} == {"v0001"}, "one model, registered once"
    assert len({d["model_dir"] for d in docs}) == 1
    store = Path(cfg.store.root)
    reg = Path(docs[0]["model_dir"]).parent.parent  # <registry>/<name>/v0001/model
    assert sorted(p.name for p in reg.glob("v[0-9]*") if p.is_dir()) == ["v0001"]
    assert all(d["promoted"] for d in docs), [d["promotion_reason"] for d in docs]
    assert (reg / "production").read_text() == "v0001"
    leftovers = [p for p in store.rglob(".tmp-*")] + [p for p in store.rglob("*.part")]
    assert not leftovers, leftovers
    history = [json.loads(p.read_text()) for p in sorted((reg / "log").glob("*.json"))]
    assert [h["action"] for h in history] == ["register"]
