import json

import pytest

from domaintune.errors import ConfigError, ContractViolation
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.validate import validate
from tests.conftest import write_csv


def test_good_data_passes_with_a_saved_report(tmp_path, make_config, rows):
    cfg = make_config(write_csv(tmp_path / "ok.csv", rows(12)))
    store = Store(cfg.store.root)
    report = validate(cfg, ingest(cfg, store), store)
    assert report.success and report.failed == 0 and report.evaluated == 7
    doc = json.loads(open(report.report_json).read())
    assert doc["success"] is True and {r["id"] for r in doc["results"]} >= {
        "label_in_set",
        "rows_per_class",
    }
    assert "PASSED" in open(report.report_markdown).read()
    assert validate(cfg, ingest(cfg, store), store).reused


def test_violations_list_each_rule_with_counts_and_example_rows(tmp_path, make_config, rows):
    r = rows(12)
    r[3]["label"] = "postive"  # typo: not a declared label (data row 4)
    r[5]["text"] = "   "  # blank (data row 6)
    r[7]["text"] = None  # missing (data row 8)
    r += [dict(r[0]) for _ in range(4)]  # duplicates: 4 of 40 = 10% > 5%
    src = write_csv(tmp_path / "bad.csv", r)
    cfg = make_config(src)
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    with pytest.raises(ContractViolation) as e:
        validate(cfg, raw, store)
    msg = str(e.value)
    assert "data contract 'text_classification' failed" in msg and str(src) in msg
    assert "label_in_set (every label is one of task.labels): 1 unexpected" in msg
    assert "bad.csv row 4: 'postive'" in msg
    assert "text_not_blank" in msg and "bad.csv row 6" in msg
    assert "text_not_null" in msg and "bad.csv row 8" in msg
    assert "duplicate_share" in msg and "0.1" in msg
    assert e.value.report_path.endswith("report.md")
    md = open(e.value.report_path).read()
    assert "FAILED" in md and "**FAIL**" in md
    report_json = e.value.report_path.replace("report.md", "report.json")
    assert json.load(open(report_json))["success"] is False
    # the raw snapshot is kept for inspection
    assert open(raw.table, "rb").read(4) == b"PAR1"


def test_rows_per_class_names_the_thin_label_and_params_override(tmp_path, make_config, rows):
    r = [x for x in rows(12) if x["label"] != "neutral"] + [
        x for x in rows(12, seed=1) if x["label"] == "neutral"
    ][:4]
    cfg = make_config(write_csv(tmp_path / "thin.csv", r))
    store = Store(cfg.store.root)
    with pytest.raises(
        ContractViolation, match=r"rows_per_class .*1 unexpected.*label 'neutral': 4"
    ):
        validate(cfg, ingest(cfg, store), store)
    relaxed = make_config(tmp_path / "thin.csv", contract={"params": {"min_rows_per_class": 3}})
    assert validate(relaxed, ingest(relaxed, store), store).success
    with pytest.raises(ConfigError, match="contract.params: unknown parameter"):
        validate(
            make_config(tmp_path / "thin.csv", contract={"params": {"min_rows": 3}}),
            ingest(relaxed, store),
            store,
        )
