"""question_answering: span contract, windows with offsets, best span, EM / F1, the real flow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from domaintune.errors import ContractViolation
from domaintune.serving.predict import PredictError
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.validate import validate
from domaintune.tasktypes.question_answering import (
    best_answers,
    exact_match,
    normalize_answer,
    token_f1,
)
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

    # predict from the registry on new questions (CSV, no answers): the evaluation's answers,
    # each a span of its context with its character offsets
    from domaintune.serving.predict import predict

    scored = pd.read_parquet(m["report"].replace("report.md", "predictions.parquet"))
    context_of = {i + 1: r["context"] for i, r in enumerate(make_qa_rows(150))}
    new = pd.DataFrame(
        {"question": scored["question"], "context": [context_of[r] for r in scored["_row"]]}
    )
    new.to_csv(tmp_path / "new.csv", index=False)
    store = Store(summary["model_dir"].rsplit("/registry/", 1)[0])
    result = predict("test-uc@latest", [str(tmp_path / "new.csv")], str(tmp_path / "a.parquet"),
                     store=store)  # fmt: skip
    got = pd.read_parquet(tmp_path / "a.parquet")
    assert got["answer"].tolist() == scored["predicted"].tolist()
    for _, row in got.iterrows():
        assert row["context"][row["answer_start"] : row["answer_end"]] == row["answer"]
        assert 0 < row["answer_score"] <= 1 and not row["no_answer"]
    assert result["counts"] == {"answered": len(got), "no_answer": 0}
    new[["question"]].to_csv(tmp_path / "no-context.csv", index=False)
    with pytest.raises(PredictError, match=r"no-context.csv: no context column 'context'"):
        predict("test-uc@latest", [str(tmp_path / "no-context.csv")], None, store=store)


def test_no_answer_wins_only_where_the_model_was_trained_for_it():
    """SQuAD 2.0's rule over windows: the first token's score (its lowest over the
    example's windows) against the best span's."""
    offsets = [[-1, -1], [-1, -1], [0, 4], [5, 9], [10, 14]]  # [CLS] question | 3 words
    context = "Anna Berg Oslo"[:14]
    span = np.full((5, 2), -5.0)
    span[2, 0], span[3, 1] = 4.0, 4.0  # "Anna Berg": start+end = 8
    null = span.copy()
    null[0] = [5.0, 5.0]  # [CLS]: 10 > 8
    for allow, expected in [(False, "Anna Berg"), (True, "")]:
        found = best_answers([0], [context], [offsets], [null], allow)
        assert found[0].text == expected and found[0].no_answer is allow
        assert (found[0].start, found[0].end) == ((0, 9) if not allow else (-1, -1))
    # a second window of the same question where [CLS] scores low: the lowest null counts
    found = best_answers([0, 0], [context] * 2, [offsets] * 2, [null, span], True)
    assert found[0].text == "Anna Berg" and 0 < found[0].score <= 1
    # a question no window can answer
    assert best_answers([3], [""], [[[-1, -1]] * 5], [span], False) == {}


def test_max_answer_tokens_caps_the_span_and_keys_the_scoring():
    """A long gold span is out of reach at SQuAD's 30-token cap and found with a higher
    task.max_answer_tokens; the setting is in the evaluation key only when it is not 30."""
    from domaintune.config import TaskConfig
    from domaintune.tasktypes import get_task_type

    words = [f"w{i}" for i in range(40)]
    context = " ".join(words)
    offsets, at = [[-1, -1]], 0
    for w in words:
        offsets.append([at, at + len(w)])
        at += len(w) + 1
    logits = np.full((41, 2), -5.0)
    logits[1, 0], logits[40, 1] = 6.0, 6.0  # the whole 40-word context: 12
    logits[1, 1] = 1.0  # the best span of at most 30 tokens: "w0" (7)
    assert best_answers([0], [context], [offsets], [logits])[0].text == "w0"
    found = best_answers([0], [context], [offsets], [logits], max_answer_tokens=40)
    assert found[0].text == context and (found[0].start, found[0].end) == (0, len(context))

    qa = get_task_type("question_answering")
    assert qa.scoring_settings(TaskConfig(type="question_answering")) is None
    longer = TaskConfig(type="question_answering", max_answer_tokens=64)
    assert qa.scoring_settings(longer) == {"max_answer_tokens": 64}
    with pytest.raises(ValueError, match="max_answer_tokens"):
        TaskConfig(type="question_answering", max_answer_tokens=0)
