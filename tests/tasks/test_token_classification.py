"""token_classification: CoNLL/JSONL input, IOB2 contract, windows for long sentences, the flow."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from domaintune.errors import ContractViolation, DataError
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.validate import validate
from domaintune.tasktypes.token_classification import iob2_error, repair_iob, spans
from tests.conftest import make_ner_sentences, merge_sections, write_conll, write_jsonl

NER = {"type": "token_classification", "labels": ["PER", "ORG", "LOC"]}


def ner_config(make_config, source, **over):
    sections = {"task": NER, "data": {"format": "conll"} if str(source).endswith(".txt") else {}}
    return make_config(source, **merge_sections(sections, over))


def test_iob_helpers():
    assert spans(["B-PER", "I-PER", "O", "I-ORG", "B-LOC"]) == [
        ("PER", 0, 1),
        ("ORG", 3, 3),
        ("LOC", 4, 4),
    ]
    assert iob2_error(["O", "I-ORG"]) == "token 2: 'I-ORG' follows 'O'"
    assert iob2_error(["B-ORG", "I-ORG", "O"]) == ""
    assert repair_iob(["I-ORG", "I-ORG", "I-PER"]) == ["B-ORG", "I-ORG", "B-PER"]


def test_conll_ingest_reads_sentences_and_names_broken_lines(tmp_path, make_config):
    src = write_conll(tmp_path / "train.txt", make_ner_sentences(20))
    cfg = ner_config(make_config, src)
    snap = ingest(cfg, Store(tmp_path / "s"))
    assert snap.rows == 20
    assert snap.labels == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
    assert set(snap.label_counts) == {"PER", "ORG", "LOC"}
    df = pd.read_parquet(snap.table)
    assert df["_row"].iloc[0] == 3  # the first token line after -DOCSTART- and a blank line
    assert len(df["tokens"].iloc[0]) == len(df["tags"].iloc[0])
    broken = tmp_path / "broken.txt"
    broken.write_text("Anna B-PER\nBerg I-PER\njoined\n")
    with pytest.raises(DataError, match=r"broken\.txt: line 3: expected 'token TAG', got 'joined'"):
        ingest(ner_config(make_config, broken), Store(tmp_path / "s"))


def test_contract_names_misaligned_unknown_and_invalid_iob_rows(tmp_path, make_config):
    rows = make_ner_sentences(20)
    rows[1] = {"tokens": ["Globex", "rose"], "tags": ["B-ORG"]}  # line 2
    rows[4] = {"tokens": ["Acme", "Corp", "fell"], "tags": ["B-ORG", "I-ORG", "B-TICKER"]}  # line 5
    rows[7] = {"tokens": ["Oslo", "Lagos", "Lima"], "tags": ["O", "I-LOC", "O"]}  # line 8
    src = write_jsonl(tmp_path / "ner.jsonl", rows)
    cfg = ner_config(make_config, src)
    store = Store(cfg.store.root)
    with pytest.raises(ContractViolation) as e:
        validate(cfg, ingest(cfg, store), store)
    msg = str(e.value)
    assert "tokens_and_tags_align" in msg and "ner.jsonl row 2: '2 tokens, 1 tags'" in msg
    assert "tags_in_set" in msg and "ner.jsonl row 5: 'B-TICKER'" in msg
    assert "valid_iob2" in msg and "ner.jsonl row 8: \"token 2: 'I-LOC' follows 'O'\"" in msg
    # IOB1-style data passes once repair is asked for
    rows[1], rows[4] = make_ner_sentences(30)[25], make_ner_sentences(30)[26]
    write_jsonl(tmp_path / "ner.jsonl", rows)
    repaired = ner_config(make_config, src, task={**NER, "iob_repair": True})
    raw = ingest(repaired, store)
    assert validate(repaired, raw, store).success
    assert any("iob_repair" in n for n in raw.notes)


def test_long_sentences_become_overlapping_windows_without_losing_entities(tmp_path, make_config):
    sentences = make_ner_sentences(30)
    long = {"tokens": [], "tags": []}
    for s in sentences[:8]:
        long["tokens"] += s["tokens"]
        long["tags"] += s["tags"]
    src = write_jsonl(tmp_path / "long.jsonl", [long, *sentences[8:]])
    cfg = ner_config(make_config, src, training={"max_length": 24}, task={**NER, "stride": 8})
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    frames = pd.concat(pd.read_parquet(s.path) for s in splits.splits.values())
    windows = frames[frames["text"] == " ".join(long["tokens"])]
    assert len(windows) > 1 and windows["input_ids"].map(len).max() <= 24
    labelled_words = {
        w
        for _, row in windows.iterrows()
        for w, lab, prev in zip(
            row["word_ids"], row["labels"], [None, *row["word_ids"][:-1]], strict=False
        )
        if lab != -100 and w != prev
    }
    entity_words = {i for i, t in enumerate(long["tags"]) if t != "O"}
    assert entity_words <= labelled_words, "every entity word is labelled in some window"
    first = frames.iloc[0]
    # first sub-token of each word labelled, the others ignored
    assert sum(lab != -100 for lab in first["labels"]) == len(first["tokens"]) or len(windows) > 1


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_ner_through_the_retrain_flow_reports_entity_f1_for_base_and_finetuned(
    tmp_path, make_config
):
    from domaintune.flows.retrain import retrain

    src = write_conll(tmp_path / "ner.txt", make_ner_sentences(120))
    cfg = ner_config(make_config, src, training={"epochs": 10})
    summary = retrain(cfg)
    m = summary["metrics"]
    assert m["primary_metric"] == "entity_f1"
    assert {"entity_f1", "entity_precision", "entity_recall", "token_accuracy"} <= set(
        m["finetuned"]
    )
    assert m["finetuned"]["entity_f1"] > m["base"]["entity_f1"], m
    metrics = json.loads(open(m["report"].replace("report.md", "metrics.json")).read())
    assert set(metrics["finetuned"]["per_type"]) == {"PER", "ORG", "LOC"}
    assert "Per entity type" in open(m["report"]).read()

    # predict from the registry on raw text: the entities are the evaluation's predicted
    # tags, as character spans of the text
    from domaintune.serving.predict import predict

    scored = pd.read_parquet(m["report"].replace("report.md", "predictions.parquet"))
    write_jsonl(
        tmp_path / "new.jsonl", [{"id": i, "text": t} for i, t in enumerate(scored["text"])]
    )
    out = tmp_path / "entities.parquet"
    summary = predict("test-uc@latest", [str(tmp_path / "new.jsonl")], str(out),
                      store=Store(cfg.store.root))  # fmt: skip
    got = pd.read_parquet(out)
    assert got["id"].tolist() == list(range(len(scored)))
    for text, tags, entities in zip(
        scored["text"], scored["predicted"], got["entities"], strict=True
    ):
        words = text.split(" ")
        starts = [sum(len(w) + 1 for w in words[:k]) for k in range(len(words))]
        expected = [
            (etype, starts[a], starts[b] + len(words[b])) for etype, a, b in spans(tags.split())
        ]
        assert [(e["type"], e["start"], e["end"]) for e in entities] == expected
        assert all(
            text[e["start"] : e["end"]] == e["text"] and 0 < e["score"] <= 1 for e in entities
        )
    assert sum(summary["counts"].values()) == got["entity_count"].sum() > 0
    predict("test-uc@latest", [str(tmp_path / "new.jsonl")], str(tmp_path / "e.csv"),
            store=Store(cfg.store.root))  # fmt: skip
    first = json.loads(pd.read_csv(tmp_path / "e.csv")["entities"].iloc[0])  # JSON in a cell
    assert first == [dict(e) for e in got["entities"].iloc[0]]


def test_predefined_splits_keep_the_official_test_set(tmp_path, make_config):
    sents = make_ner_sentences(60)
    train = write_conll(tmp_path / "train.txt", sents[:40])
    test = write_conll(tmp_path / "test.txt", sents[40:] + sents[40:42])  # duplicates kept in test
    cfg = make_config(
        None,
        task=NER,
        data={
            "source": None,
            "splits": {"train": str(train), "test": str(test)},
            "format": "conll",
        },
    )
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    assert {s.split for s in raw.sources} == {"train", "test"}
    splits = preprocess(cfg, raw, store)
    assert splits.splits["test"].rows == 22, "the official test set is used whole"
    assert splits.splits["train"].rows + splits.splits["validation"].rows == 40
    assert splits.splits["validation"].rows == 6  # evaluation.val_size of train
