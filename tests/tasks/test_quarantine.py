"""data.on_invalid: quarantine: rows that break row rules (or do not parse) are left out with
their reasons while they stay below data.max_invalid_share; anything else still fails."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from domaintune.errors import ContractViolation, DataError
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.validate import validate
from tests.conftest import make_ner_sentences, write_conll, write_csv, write_jsonl

QUARANTINE = {"on_invalid": "quarantine"}
NER = {"type": "token_classification", "labels": ["PER", "ORG", "LOC"]}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _broken_rows(rows):
    r = rows(20)  # 60 rows
    r[3]["label"] = "postive"  # data row 4: a label outside the set
    r[5]["text"] = "   "  # row 6: blank
    r[7]["text"] = None  # row 8: missing
    return r


def test_rows_breaking_row_rules_are_quarantined_with_reasons_and_left_out(
    tmp_path, make_config, rows
):
    src = write_csv(tmp_path / "in" / "broken.csv", _broken_rows(rows))
    before = _sha(src)
    cfg = make_config(src, data=QUARANTINE)
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    report = validate(cfg, raw, store)
    assert report.success and report.quarantined_rows == 3
    assert report.quarantine_share == pytest.approx(3 / 60)
    q = pd.read_parquet(report.quarantine_table)
    assert list(q["_row"]) == [4, 6, 8] and set(q["_source"]) == {str(src)}
    assert q.loc[0, "label"] == "postive", "the row as ingested, untouched"
    assert list(q.loc[0, "_rules"]) == ["label_in_set"]
    assert (
        "label_in_set: every label is one of task.labels (label='postive')" in q.loc[0, "_reasons"]
    )
    assert list(q.loc[1, "_rules"]) == ["text_not_blank"]
    assert "text_not_null" in q.loc[2, "_reasons"]
    doc = json.loads(open(report.report_json).read())
    assert doc["success"] and doc["quarantine"]["rows"] == 3
    assert doc["quarantine"]["by_rule"] == {
        "label_in_set": 1,
        "text_not_blank": 1,
        "text_not_null": 1,
    }
    assert {r["id"] for r in doc["quarantine"]["row_rule_failures"]} == {
        "label_in_set",
        "text_not_blank",
        "text_not_null",
    }
    assert all(r["success"] for r in doc["results"]), "the contract passes on the rows kept"
    md = open(report.report_markdown).read()
    assert "PASSED with 3 row(s) quarantined" in md and "## Quarantine" in md
    assert "broken.csv row 4" in md
    # raw data is never modified: the file and the raw snapshot keep every row
    assert _sha(src) == before and len(pd.read_parquet(raw.table)) == 60

    splits = preprocess(cfg, raw, store, validation=report)
    assert splits.stats["quarantined"] == 3
    assert sum(s.rows for s in splits.splits.values()) == 57
    for info in splits.splits.values():
        assert "postive" not in info.label_counts
    # the same run again reuses both entries; without the quarantine the key differs
    assert validate(cfg, raw, store).reused
    assert preprocess(cfg, raw, store, validation=report).reused
    assert preprocess(cfg, raw, store).key != splits.key


def test_a_quarantine_above_the_share_fails_and_names_the_rows(tmp_path, make_config, rows):
    src = write_csv(tmp_path / "broken.csv", _broken_rows(rows))
    cfg = make_config(src, data={**QUARANTINE, "max_invalid_share": 0.04})
    store = Store(cfg.store.root)
    with pytest.raises(ContractViolation) as e:
        validate(cfg, ingest(cfg, store), store)
    first = str(e.value).splitlines()[0]
    assert "invalid_share (at most 0.04 of the rows may be quarantined" in first
    assert (
        "3 unexpected (5.0%)" in first and "broken.csv row 4" in first and "label_in_set" in first
    )
    report_dir = e.value.report_path.rsplit("/", 1)[0]
    assert len(pd.read_parquet(f"{report_dir}/quarantine.parquet")) == 3, "kept for inspection"
    assert "the run stops" in open(e.value.report_path).read()


def test_whole_data_rules_are_judged_on_the_rows_kept(tmp_path, make_config, rows):
    r = rows(20)
    for i, row in enumerate(r):
        if row["label"] == "neutral" and i % 2:
            row["label"] = "neutrl"  # half the neutral rows: rows_per_class breaks without them
    src = write_csv(tmp_path / "thin.csv", r)
    cfg = make_config(
        src,
        data={**QUARANTINE, "max_invalid_share": 0.5},
        contract={"params": {"min_rows_per_class": 15}},
    )
    store = Store(cfg.store.root)
    with pytest.raises(ContractViolation) as e:
        validate(cfg, ingest(cfg, store), store)
    msg = str(e.value)
    assert "rows_per_class" in msg and "label 'neutral': 10" in msg
    assert "label_in_set" not in msg.splitlines()[0], "the bad labels were quarantined"


def test_unknown_tags_and_bad_iob_sentences_are_quarantined(tmp_path, make_config):
    sents = make_ner_sentences(60, seed=3)
    sents[2]["tags"][0] = "I-ORG"  # an I- tag opening a sentence: not IOB2
    sents[4]["tags"][-1] = "B-PRODUCT"  # an entity type nobody declared
    src = write_conll(tmp_path / "ner.conll", sents)
    cfg = make_config(
        src,
        task=NER,
        data={**QUARANTINE, "max_invalid_share": 0.1},
    )
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    report = validate(cfg, raw, store)
    assert report.quarantined_rows == 2
    q = pd.read_parquet(report.quarantine_table)
    assert {tuple(r) for r in q["_rules"]} == {("valid_iob2",), ("tags_in_set",)}
    assert all(len(t) == len(g) for t, g in zip(q["tokens"], q["tags"], strict=True))


def test_jsonl_and_conll_records_that_do_not_parse_are_held_for_the_quarantine(
    tmp_path, make_config, rows
):
    path = write_jsonl(tmp_path / "data.jsonl", rows(20))
    lines = path.read_text().splitlines()
    lines[9] = '{"text": "cut off mid-rec'  # line 10
    lines[19] = '["a list", "not an object"]'  # line 20
    path.write_text("\n".join(lines) + "\n")
    before = _sha(path)
    with pytest.raises(DataError, match=r"data\.jsonl: line 10: not valid JSON"):
        ingest(make_config(path), Store(tmp_path / "s0"))
    cfg = make_config(path, data=QUARANTINE)
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    assert raw.rows == 58 and raw.unparsed_rows == 2
    assert any("2 record(s) did not parse" in n for n in raw.notes)
    report = validate(cfg, raw, store)
    assert report.success and report.quarantined_rows == 2
    q = pd.read_parquet(report.quarantine_table)
    assert list(q["_row"]) == [10, 20] and list(q["_rules"].map(list)) == [["parse"], ["parse"]]
    assert q.loc[0, "_record"] == '{"text": "cut off mid-rec'
    assert "line 20: expected a JSON object, got list" in q.loc[1, "_reasons"]
    assert _sha(path) == before

    sents = make_ner_sentences(40, seed=1)
    conll = write_conll(tmp_path / "ner.conll", sents)
    text = conll.read_text().splitlines()
    bad_line = next(i for i, line in enumerate(text) if line and not line.startswith("-DOC"))
    text[bad_line] = text[bad_line].split()[0]  # a token without its tag
    conll.write_text("\n".join(text) + "\n")
    ner = make_config(
        conll,
        task=NER,
        data={**QUARANTINE, "max_invalid_share": 0.1},
    )
    raw = ingest(ner, Store(ner.store.root))
    assert raw.rows == 39 and raw.unparsed_rows == 1
    report = validate(ner, raw, Store(ner.store.root))
    q = pd.read_parquet(report.quarantine_table)
    assert "expected 'token TAG'" in q.loc[0, "_reasons"] and "\n" in q.loc[0, "_record"]
