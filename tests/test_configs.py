"""Every example config under configs/ is a valid config for a known task type."""

from pathlib import Path

import pytest

from domaintune.runconfig import load_config
from domaintune.tasktypes import get_task_type

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    cfg = load_config(path)
    task = get_task_type(cfg.task.type)
    assert cfg.model.name_or_path and cfg.evaluation.primary_metric
    assert task.name == cfg.task.type


def test_every_task_type_has_an_example():
    types = {load_config(p).task.type for p in CONFIGS}
    assert {
        "text_classification",
        "token_classification",
        "question_answering",
        "causal_lm",
    } <= types


def test_the_bbc_qa_example_passes_its_contract(tmp_path, monkeypatch):
    from domaintune.storage.store import Store
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.validate import validate

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    cfg = load_config(root / "configs" / "qa_bbc_business.yaml", [f"store.root={tmp_path}"])
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    assert raw.rows == 35 and raw.label_counts["answerable"] == 35
    assert validate(cfg, raw, store).success
