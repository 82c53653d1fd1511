"""The ``score`` flow through real Prefect: a landing folder scored with the production model,
each file once per model (cached by the model's and the file's content), with its artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from domaintune.config import StoreConfig
from domaintune.serving.predict import predict
from domaintune.storage.store import Store
from domaintune.tasks.evaluate import evaluate
from domaintune.tasks.finetune import finetune
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.register import register
from domaintune.tasks.score import ScoreConfig
from tests.conftest import LABELS, write_csv, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def _artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_a_landing_folder_is_scored_once_per_file_and_model(tmp_path, make_config, rows):
    from domaintune.flows.score import score

    cfg = make_config(write_csv(tmp_path / "d.csv", rows(30)))
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    splits = preprocess(cfg, raw, store)
    model = finetune(cfg, splits, store)
    reg = register(cfg, raw, splits, model, evaluate(cfg, splits, model, store), store)
    assert reg.promoted

    incoming = tmp_path / "landing" / "finance-incoming"
    incoming.mkdir(parents=True)
    job = ScoreConfig(
        name="finance-news",
        model="test-uc@production",
        source=str(incoming / "*"),
        store=StoreConfig(root=cfg.store.root),
    )
    # nothing landed yet: a completed run that says so
    empty = score(job)
    assert empty["files"] == [] and empty["rows"] == 0

    texts = [r["text"] for r in rows(2)]  # 6
    pd.DataFrame({"id": [1, 2, 3], "text": texts[:3]}).to_csv(incoming / "a.csv", index=False)
    write_jsonl(incoming / "b.jsonl", [{"text": t} for t in texts[3:5]])
    before = {p: p.read_bytes() for p in incoming.iterdir()}
    state = score(job, return_state=True)
    first = state.result()
    assert first["model"] == f"test-uc@{reg.version}", "pinned to the version it named"
    assert (first["scored"], first["cached"], first["rows"]) == (2, 0, 5)
    by_file = {Path(f["file"]).name: f for f in first["files"]}
    assert {f["version"] for f in first["files"]} == {reg.version}
    a = pd.read_parquet(by_file["a.csv"]["predictions"])
    assert a["id"].tolist() == ["1", "2", "3"] and set(a["predicted"]) <= set(LABELS)
    # the same predictions as `domaintune predict`, and the counts are theirs
    direct = predict("test-uc@production", [str(incoming / "a.csv")], None, store=store)
    assert a["predicted"].value_counts().to_dict() == direct["counts"]
    assert sum(first["counts"].values()) == 5
    manifest = json.loads(
        (Path(by_file["a.csv"]["predictions"]).parent / "_COMPLETE.json").read_text()
    )["manifest"]
    assert manifest["version"] == reg.version and manifest["source"].endswith("a.csv")
    assert {p: p.read_bytes() for p in incoming.iterdir()} == before, "inputs only read"

    # the artifact: which version scored which file, and the counts with a chart
    artifacts = _artifacts(state.state_details.flow_run_id)
    kinds = {a.type: a for a in artifacts}
    assert {"table", "markdown"} <= set(kinds)
    markdown = kinds["markdown"].data
    assert f"scored by **test-uc@{reg.version}**" in markdown
    assert "data:image/svg+xml;base64," in markdown
    for label, count in first["counts"].items():
        assert f"| {label} | {count} |" in markdown

    # again: every file Cached; one new file: only it is scored
    assert (score(job)["scored"], score(job)["cached"]) == (0, 2)
    write_csv(incoming / "c.csv", rows(1)[:2])
    third = score(job)
    assert (third["scored"], third["cached"], third["rows"]) == (1, 2, 7)

    # the same model by its folder: the same content, so the same entries
    folder = Path(cfg.store.root) / "registry" / "test-uc" / reg.version
    same = score(job.model_copy(update={"model": str(folder)}))
    assert (same["scored"], same["cached"]) == (0, 3)
    # a different model (another classifier head): every file is scored again
    import torch
    from transformers import AutoModelForSequenceClassification

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    net = AutoModelForSequenceClassification.from_pretrained(other / "model")
    with torch.no_grad():
        net.classifier.weight.mul_(-1)
    net.save_pretrained(other / "model")
    changed = score(job.model_copy(update={"model": str(other)}))
    assert (changed["scored"], changed["cached"]) == (3, 0)


def test_a_bad_model_reference_fails_the_run_with_one_line(tmp_path):
    from domaintune.flows.score import score

    job = ScoreConfig(
        name="x", model="nope@production", source=str(tmp_path), store={"root": str(tmp_path)}
    )
    state = score(job, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert message.startswith("nope@production: ") and "\n" not in message
    assert "rule: " in message, "says which rule the reference breaks"
