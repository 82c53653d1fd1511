"""Every case of the bad-input corpus fails with its own clear, one-line error, leaves the
input files untouched and trains nothing."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from domaintune import errors
from domaintune.runconfig import load_config
from domaintune.storage.store import Store
from domaintune.tasks.finetune import plan as finetune_plan
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.validate import validate
from domaintune.training.strategies import preflight
from tests.bad_inputs.corpus import CASES
from tests.conftest import merge_sections


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_stages(sections: dict, tmp_path: Path, tiny_model: Path) -> None:
    """What a run does before any training starts."""
    defaults = {
        "name": "bad-input",
        "task": {"type": "text_classification", "labels": ["negative", "positive"]},
        "model": {"name_or_path": str(tiny_model)},
        "training": {"max_length": 32},
        "evaluation": {"test_size": 0.2, "val_size": 0.15},
        "store": {"root": str(tmp_path / "store")},
    }
    data = merge_sections(defaults, sections)
    if data["task"].get("type") == "question_answering":
        data["task"].pop("labels", None)
    cfg = load_config(data=data)
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    validate(cfg, raw, store)
    splits = preprocess(cfg, raw, store)
    finetune_plan(cfg, splits)
    preflight(cfg.training, str(cfg.model.name_or_path), cfg.task.type)


def test_the_corpus_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_its_clear_error(case, tmp_path, tiny_model):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    sections = case.build(inputs)
    before = _digest(inputs)
    with pytest.raises(errors.DomainTuneError) as e:
        if case.action:
            case.action(sections)
        else:
            run_stages(sections, tmp_path, tiny_model)
    first = str(e.value).splitlines()[0]
    assert type(e.value).__name__ == case.error, f"{type(e.value).__name__}: {e.value}"
    assert re.search(case.expect, str(e.value) if case.error == "ConfigError" else first), (
        f"{case.name}: {e.value}"
    )
    assert len(first) < 1000
    assert _digest(inputs) == before, "the raw input was modified"
    assert not (tmp_path / "store" / "finetune").exists() or not any(
        p.name != ".work" for p in (tmp_path / "store" / "finetune").iterdir()
    ), "a model was trained from bad input"
