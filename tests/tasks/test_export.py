"""export: ONNX and int8 ONNX of the encoders, checked for parity on the test split, kept
in the store and the registry, run by ``predict --runtime``; a refused export leaves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from domaintune.errors import ExportError
from domaintune.serving.predict import predict
from domaintune.storage.store import Store
from domaintune.tasks.evaluate import evaluate
from domaintune.tasks.export import STAGE, export, export_format, job_of_run
from domaintune.tasks.finetune import finetune
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.register import register
from tests.conftest import write_csv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A tiny classifier trained through the stages, with ``export.formats`` set."""
    from domaintune.runconfig import load_config
    from tests.conftest import LABELS, TINY_EVALUATION, TINY_TRAINING, make_rows

    tmp = tmp_path_factory.mktemp("export")
    source = write_csv(tmp / "d.csv", make_rows(30))
    cfg = load_config(
        data={
            "name": "exp-uc",
            "task": {"type": "text_classification", "labels": LABELS},
            "data": {"source": str(source)},
            "model": {"name_or_path": str(tiny_model)},
            "training": {**TINY_TRAINING, "seed": 7, "warmup_ratio": 0.0},
            "evaluation": TINY_EVALUATION,
            "retries": {"count": 0, "delay_seconds": 0},
            "store": {"root": str(tmp / "store")},
            "export": {"formats": ["onnx", "onnx-int8"]},
        }
    )
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    splits = preprocess(cfg, raw, store)
    model = finetune(cfg, splits, store)
    evaluation = evaluate(cfg, splits, model, store)
    return cfg, store, raw, splits, model, evaluation, tmp


@pytest.fixture(scope="module")
def registered(trained):
    """Both exports made and the version registered with them."""
    cfg, store, raw, splits, model, evaluation, tmp = trained
    onnx = export(cfg, splits, model, store, fmt="onnx")
    int8 = export(cfg, splits, model, store, fmt="onnx-int8")
    reg = register(cfg, raw, splits, model, evaluation, store, exports=[onnx, int8])
    return onnx, int8, reg


def test_onnx_exports_match_the_model_are_cached_registered_and_served(trained, registered):
    cfg, store, raw, splits, model, evaluation, tmp = trained
    onnx, int8, reg = registered
    assert onnx.refused is None and not onnx.reused
    p = onnx.parity
    assert p["identical_predictions"] == 1.0 and p["max_logit_difference"] <= 1e-3
    assert p["rows"] == splits.splits["test"].rows and p["export"] == p["model"]
    lat = onnx.latency
    assert lat["export"]["single_p50_ms"] > 0 and lat["torch"]["batch32_texts_per_s"] > 0
    assert "bf16" in onnx.machine and "model.onnx" in onnx.files
    record = json.loads((Path(onnx.path) / "export.json").read_text())
    assert record["parity"] == p

    assert int8.refused is None
    assert int8.parity["model"] - int8.parity["export"] <= cfg.export.int8_tolerance
    # the same model again: both entries reused, nothing exported twice
    assert export(cfg, splits, model, store, fmt="onnx").reused
    assert export(cfg, splits, model, store, fmt="onnx-int8").reused

    version = Path(reg.path)
    assert (version / "exports" / "onnx" / "model.onnx").is_file()
    assert (version / "exports" / "onnx-int8" / "export.json").is_file()
    assert reg.exports["onnx"]["parity"]["identical_predictions"] == 1.0
    assert "exports/onnx-int8" == reg.exports["onnx-int8"]["path"]
    card = (version / "model" / "README.md").read_text()
    assert "## Exports" in card and "onnx-int8" in card

    # predict: the same columns and labels from ONNX Runtime as from PyTorch
    scored = pd.read_parquet(Path(evaluation.path) / "predictions.parquet")
    pd.DataFrame({"text": scored["text"]}).to_csv(tmp / "new.csv", index=False)
    runs = {}
    for runtime in ("torch", "onnx", "onnx-int8", "auto"):
        out = tmp / f"p-{runtime}.parquet"
        summary = predict(
            "exp-uc@production", [str(tmp / "new.csv")], str(out), store=store, runtime=runtime
        )
        runs[runtime] = (pd.read_parquet(out), summary)
    torch_out, onnx_out = runs["torch"][0], runs["onnx"][0]
    assert list(torch_out.columns) == list(onnx_out.columns)
    assert runs["onnx"][1]["runtime"] == "onnx" and runs["torch"][1]["runtime"] == "torch"
    assert runs["auto"][1]["runtime"] in ("onnx", "onnx-int8")  # the faster verified one
    probs = [c for c in torch_out.columns if c.startswith("prob_")]
    # torch scores in the training's precision (bf16 on this CPU), ONNX in fp32
    assert np.allclose(torch_out[probs], onnx_out[probs], atol=0.02)


def test_a_refused_export_leaves_no_entry_and_names_the_rule(trained):
    cfg, store, raw, splits, model, evaluation, tmp = trained
    job = job_of_run(cfg, splits, model)
    # int8 held to a tolerance no quantized model meets: refused before anything is kept
    job.export = job.export.model_copy(update={"int8_tolerance": 0.0, "logit_tolerance": 1e-12})
    with pytest.raises(ExportError) as caught:
        export_format(job, "onnx", store)
    message = str(caught.value)
    assert "\n" not in message and "rule: identical predictions and logits within" in message
    entries = [p for p in (Path(cfg.store.root) / STAGE).iterdir() if not p.name.startswith(".")]
    assert all((p / "_COMPLETE.json").is_file() for p in entries)
    assert not list((Path(cfg.store.root) / STAGE).glob(".tmp-*"))
    with pytest.raises(ExportError, match="cannot be made for a text_classification model"):
        export_format(job, "gguf", store)


def _post(url: str, body: dict, timeout: float = 30.0) -> dict:
    import urllib.request

    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_mlflow_serves_the_registered_version_as_predict_does(trained, registered, tmp_path):
    """``domaintune serve-model`` -> ``mlflow models serve`` on 127.0.0.1: HTTP answers equal
    ``domaintune predict``'s, under a short concurrent load; the server stops with its group."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    import urllib.request

    from domaintune.serving.serve import free_port

    cfg, store, raw, splits, model, evaluation, tmp = trained
    texts = pd.read_parquet(Path(evaluation.path) / "predictions.parquet")["text"].tolist()
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "in.csv", index=False)
    expected = predict(
        "exp-uc@production", [str(tmp_path / "in.csv")], str(tmp_path / "p.parquet"), store=store
    )
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "domaintune.cli", "serve-model", "exp-uc@production",
         "--store", cfg.store.root, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "DOMAINTUNE_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.time() < deadline, "the model server did not answer within 180 s"
            time.sleep(0.5)
        answer = _post(f"{base}/invocations", {"dataframe_records": [{"text": t} for t in texts]})
        served = pd.DataFrame(answer["predictions"])
        want = pd.read_parquet(tmp_path / "p.parquet")
        assert served["predicted"].tolist() == want["predicted"].tolist()
        assert [c for c in want.columns if c.startswith("prob_")] == [
            c for c in served.columns if c.startswith("prob_")
        ]
        assert expected["runtime"] in ("onnx", "onnx-int8")
        # a bounded load: 8 clients for 3 s, every answer right
        errors, latencies = [], []
        stop = time.time() + 3

        def client(i: int) -> None:
            while time.time() < stop:
                t0 = time.perf_counter()
                try:
                    got = _post(f"{base}/invocations", {"dataframe_records": [{"text": texts[i]}]})
                    assert got["predictions"][0]["predicted"] == want["predicted"][i]
                    latencies.append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 - counted, reported below
                    errors.append(repr(exc))

        threads = [threading.Thread(target=client, args=(i % len(texts),)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[:3]
        assert len(latencies) >= 8
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        log.close()
    # nothing left listening once uvicorn has shut down (it ends after its parent)
    import socket

    deadline = time.time() + 30
    while True:
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.time() < deadline, "the model server still listens 30 s after SIGTERM"
        time.sleep(0.5)


@pytest.mark.parametrize("kind", ["token_classification", "question_answering"])
def test_ner_and_qa_export_to_onnx_with_identical_tags_and_answers(
    kind, tmp_path, make_config, tiny_model
):
    """The other encoders: tags (NER, word by word from windows) and answer spans (QA,
    best span over windows) identical from ONNX Runtime; int8 within its tolerance."""
    from tests.conftest import make_ner_sentences, make_qa_rows, write_conll, write_jsonl

    if kind == "token_classification":
        source = write_conll(tmp_path / "train.txt", make_ner_sentences(40))
        sections = {
            "task": {"type": kind, "labels": ["PER", "ORG", "LOC"]},
            "data": {"format": "conll"},
        }
    else:
        source = write_jsonl(tmp_path / "qa.jsonl", make_qa_rows(40))
        sections = {"task": {"type": kind}, "training": {"max_length": 64}}
    cfg = make_config(source, **sections)
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    model = finetune(cfg, splits, store)
    onnx = export(cfg, splits, model, store, fmt="onnx")
    assert onnx.refused is None, onnx.refused
    assert onnx.parity["identical_predictions"] == 1.0
    assert onnx.parity["max_logit_difference"] <= 1e-3
    assert onnx.parity["metric"] == cfg.evaluation.primary_metric
    int8 = export(cfg, splits, model, store, fmt="onnx-int8")
    assert int8.refused is None or "rule: within 0.005" in int8.refused
