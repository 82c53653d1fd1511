"""``domaintune predict``: batch predictions from the registry, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from domaintune.serving.predict import PredictError, predict
from domaintune.storage.store import Store
from domaintune.tasks.evaluate import evaluate
from domaintune.tasks.finetune import finetune
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.register import register
from tests.conftest import LABELS, write_csv

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "domaintune.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_predictions_from_the_registry_are_the_evaluations_and_keep_the_input(
    tmp_path, make_config, rows
):
    cfg = make_config(write_csv(tmp_path / "d.csv", rows(30)))
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    splits = preprocess(cfg, raw, store)
    model = finetune(cfg, splits, store)
    evaluation = evaluate(cfg, splits, model, store)
    reg = register(cfg, raw, splits, model, evaluation, store)
    assert reg.promoted

    # the test split's texts, as a new export without labels and with a column of its own
    scored = pd.read_parquet(Path(evaluation.path) / "predictions.parquet")
    new = pd.DataFrame({"id": range(len(scored)), "text": scored["text"]})
    new.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "out" / "predictions.parquet"
    summary = predict("test-uc@production", [str(tmp_path / "new.csv")], str(out), store=store)
    assert summary["version"] == reg.version and summary["rows"] == len(new)
    got = pd.read_parquet(out)
    # every input column kept, in order; the model's predictions are the evaluation's
    assert (
        list(got.columns[:2]) == ["id", "text"]
        and got["id"].tolist() == new["id"].astype(str).tolist()
    )  # as read: text
    assert got["predicted"].tolist() == scored["predicted"].tolist()
    probs = got[[f"prob_{label}" for label in LABELS]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.allclose(got["confidence"], probs.max(1))
    assert summary["counts"] == got["predicted"].value_counts().to_dict()

    # JSON Lines in Latin-1 with one broken record: decoded, the record left out and counted
    lines = [
        json.dumps({"text": t}, ensure_ascii=False)
        for t in ["Café profit record gain", "weak loss"]
    ]
    (tmp_path / "latin.jsonl").write_bytes(
        "\n".join([lines[0], "{broken", lines[1]]).encode("latin-1")
    )
    summary = predict("test-uc@latest", [str(tmp_path / "*.jsonl")], str(tmp_path / "p.jsonl"),
                      store=store)  # fmt: skip
    got = pd.read_json(tmp_path / "p.jsonl", lines=True)
    assert got["text"].tolist() == ["Café profit record gain", "weak loss"]
    assert set(got["predicted"]) <= set(LABELS)
    assert any("did not parse" in n and "record 2" in n for n in summary["notes"])
    assert any("decoded as" in n for n in summary["notes"])

    # a version folder works as well as a reference, and CSV output keeps the columns
    predict(str(Path(cfg.store.root) / "registry" / "test-uc" / reg.version),
            [str(tmp_path / "new.csv")], str(tmp_path / "p.csv"))  # fmt: skip
    assert pd.read_csv(tmp_path / "p.csv")["predicted"].tolist() == scored["predicted"].tolist()

    # one clear line for each bad reference, input or output
    for ref, inputs, out_name, expected in [
        ("test-uc@v0009", ["new.csv"], "x.csv", "has no version 'v0009' (versions: v0001"),
        ("nope@production", ["new.csv"], "x.csv", "no use case 'nope'"),
        ("test-uc@production", ["new.csv"], "x.xlsx", "unknown output format '.xlsx'"),
        ("test-uc@production", ["none-*.csv"], "x.csv", "matched no files"),
    ]:
        with pytest.raises(PredictError, match=expected.replace("(", r"\(")):
            predict(ref, [str(tmp_path / i) for i in inputs], str(tmp_path / out_name), store=store)
    pd.DataFrame({"body": ["a"]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(PredictError, match=r"other.csv: no text column 'text' \(columns: body\)"):
        predict("test-uc@production", [str(tmp_path / "other.csv")], None, store=store)

    # the command: a JSON summary, exit 0; a bad reference, one line and exit 2
    done = cli("predict", "test-uc@production", str(tmp_path / "new.csv"), "--store",
               cfg.store.root, "--out", str(tmp_path / "cli.parquet"), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["rows"] == len(new) and doc["version"] == reg.version
    assert (
        pd.read_parquet(tmp_path / "cli.parquet")["predicted"].tolist()
        == scored["predicted"].tolist()
    )
    bad = cli("predict", "test-uc@v0042", str(tmp_path / "new.csv"), "--store", cfg.store.root)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "has no version 'v0042'" in bad.stderr and "Traceback" not in bad.stderr


def test_a_bare_model_folder_is_served_by_the_task_its_architecture_names(tmp_path, tiny_model):
    """A plain Hugging Face folder (no config.yaml): its architecture names the task; one
    whose architecture names none is one clear line, and nothing is written."""
    import transformers

    qa = tmp_path / "qa"
    transformers.AutoModelForQuestionAnswering.from_pretrained(tiny_model).save_pretrained(qa)
    transformers.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(qa)
    contexts = ["Anna Berg joined Acme Corp in Oslo .", "Globex hired Tom Hale ."]
    pd.DataFrame({"question": ["Who joined Acme Corp ?", "Who was hired ?"],
                  "context": contexts}).to_csv(tmp_path / "q.csv", index=False)  # fmt: skip
    summary = predict(str(qa), [str(tmp_path / "q.csv")], str(tmp_path / "a.jsonl"))
    got = pd.read_json(tmp_path / "a.jsonl", lines=True)
    assert summary["task_type"] == "question_answering" and len(got) == 2
    for context, answer, start, end in zip(
        contexts, got["answer"], got["answer_start"], got["answer_end"], strict=True
    ):
        assert context[start:end] == answer  # an untrained head: some span, still a span

    folder = tmp_path / "model"
    transformers.AutoModel.from_pretrained(tiny_model).save_pretrained(folder)
    pd.DataFrame({"text": ["a"]}).to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(PredictError, match="cannot tell the task type of"):
        predict(str(folder), [str(tmp_path / "in.csv")], str(tmp_path / "out.csv"))
    assert not (tmp_path / "out.csv").exists()
