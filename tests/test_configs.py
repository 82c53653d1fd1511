"""Every example config under configs/ is a valid config for a known task type."""

from pathlib import Path

import pytest

from domaintune.config import load_config
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
    assert {"text_classification", "token_classification", "causal_lm"} <= types
