"""question_answering: span contract, windows with offsets, best span, EM / F1, the real flow."""

from __future__ import annotations

import pandas as pd
import pytest

from domaintune.errors import ContractViolation
from domaintune.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.validate import validate
from domaintune.tasktypes.question_answering import exact_match, normalize_answer, token_f1
from tests.conftest import make_qa_rows, merge_sections, write_jsonl

QA = {"type": "question_answering"}


def qa_config(make_config, source, **over):
    sections = {"task": QA, "training": {"max_length": 64}}
    return make_config(source, **merge_sections(sections, over))


def test_squad_metrics():
    assert normalize_answer("The  Acme, Corp.") == "acme corp"
    assert exact_match("the Acme Corp", ["Acme Corp", "Globex"]) == 1.0
    assert token_f1("Acme Corp shares", ["Acme Corp"]) == pytest.approx(0.8)
    assert token_f1("Globex", ["Acme Corp"]) == 0.0


def test_contract_checks_every_answer_against_its_span(tmp_path, make_config):
    rows = make_qa_rows(20)
    rows[2]["answers"]["answer_start"] = [0]  # points at the wrong place (line 3)
    rows[5]["answers"] = {"text": [], "answer_start": []}  # unanswerable (line 6)
    src = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = qa_config(make_config, src)
    store = Store(cfg.store.root)
    with pytest.raises(ContractViolation) as e:
        validate(cfg, ingest(cfg, store), store)
    msg = str(e.value)
    assert "answer_matches_span" in msg and "2 unexpected" in msg
    assert "qa.jsonl row 3" in msg and "!= context[0:" in msg
    assert "qa.jsonl row 6" in msg and "task.allow_unanswerable" in msg


def test_long_contexts_become_windows_that_still_locate_the_answer(tmp_path, make_config):
    rows = make_qa_rows(30)
    pad = " ".join(["the market was calm that day ."] * 30)
    for r in rows[:10]:  # the answer far into a long context
        shift = len(pad) + 1
        r["context"] = pad + " " + r["context"]
        r["answers"]["answer_start"] = [r["answers"]["answer_start"][0] + shift]
    src = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = qa_config(make_config, src, task={**QA, "stride": 16})
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    validate(cfg, raw, store)
    splits = preprocess(cfg, raw, store)
    windows = pd.concat(pd.read_parquet(s.path) for s in splits.splits.values())
    long_windows = windows[windows["context"].str.startswith(pad)]
    assert long_windows.groupby("_example").size().max() > 1, "long contexts are split into windows"
    for _, w in windows.iterrows():
        if w["start_positions"] > 0:
            offsets = [list(o) for o in w["offsets"]]
            span = w["context"][offsets[w["start_positions"]][0] : offsets[w["end_positions"]][1]]
            answer = (
                eval(w["answers"])
                if isinstance(w["answers"], dict)
                else __import__("json").loads(w["answers"])
            )
            assert span == answer["text"][0]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_qa_flow_reports_em_and_f1_for_base_and_finetuned(tmp_path, make_config):
    from domaintune.flows.retrain import retrain

    src = write_jsonl(tmp_path / "qa.jsonl", make_qa_rows(150))
    summary = retrain(qa_config(make_config, src, training={"epochs": 10}))
    m = summary["metrics"]
    assert m["primary_metric"] == "f1"
    assert {"f1", "exact_match"} <= set(m["finetuned"]) and {"f1", "exact_match"} <= set(m["base"])
    assert m["finetuned"]["f1"] > m["base"]["f1"], m
