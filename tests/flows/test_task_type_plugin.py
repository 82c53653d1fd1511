"""A task type is one class (plus its contract), found by name: the config, the stages and
the training strategies ask it for its metrics, default model and head; nothing else lists
it. A toy task type from another package (an entry point) runs through the real retrain
flow, training worker included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from domaintune.errors import ConfigError
from domaintune.runconfig import load_config
from domaintune.tasktypes import get_task_type, task_type_names
from tests.conftest import write_csv

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


TOY = """
from pathlib import Path

from pydantic import BaseModel, Field

from domaintune.tasktypes.text_classification import TextClassification


class ToyOptions(BaseModel):
    model_config = {{"extra": "forbid"}}

    #: the confidence from which a prediction counts as sure
    sure_at: float = Field(0.5, gt=0, lt=1)


class ToyTopics(TextClassification):
    \"\"\"Short-text topics judged by macro-F1 first, on the tiny test model by default,
    without a replaceable head; the text-classification contract.\"\"\"

    name = "toy_topics"
    metrics = ("macro_f1", "accuracy")
    default_model = {model!r}
    custom_head = False
    contract = str(Path(__file__).with_name("toy_topics.yaml"))  # shipped beside it
    options_model = ToyOptions  # its own settings: task.options

    def predict(self, model, table, text_column, load):
        \"\"\"The topic, and whether the model is sure of it (its own column and counts).\"\"\"
        out = super().predict(model, table, text_column, load)
        out["sure"] = out["confidence"] >= self.options(model.task_settings()).sure_at
        return out

    def prediction_counts(self, result):
        return {{"sure": int(result["sure"].sum()), "unsure": int((~result["sure"]).sum())}}
"""


@pytest.fixture
def toy(tiny_model, tmp_path, monkeypatch):
    """A toy task type in its own package, found through the ``domaintune.task_types``
    entry-point group: an installed plug-in, as the training worker (another process) sees it
    too."""
    import importlib
    import sys

    from domaintune.tasktypes import _REGISTRY

    site = tmp_path / "site"
    (site / "toy_tasks").mkdir(parents=True)
    (site / "toy_tasks" / "__init__.py").write_text(TOY.format(model=str(tiny_model)))
    # its own contract, shipped beside the module (here: the text-classification one)
    contract = Path(__file__).resolve().parents[2] / "data_contracts/text_classification.yaml"
    (site / "toy_tasks" / "toy_topics.yaml").write_text(contract.read_text())
    info = site / "toy_tasks-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-tasks\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[domaintune.task_types]\ntoy_topics = toy_tasks:ToyTopics\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    importlib.invalidate_caches()
    yield importlib.import_module("toy_tasks").ToyTopics
    _REGISTRY.pop("toy_topics", None)
    sys.modules.pop("toy_tasks", None)


def test_a_registered_task_type_is_known_everywhere_and_runs_the_flow(toy, tmp_path, rows):
    from domaintune.flows.retrain import retrain

    assert "toy_topics" in task_type_names()
    assert type(get_task_type("toy_topics")).__qualname__ == toy.__qualname__
    src = write_csv(tmp_path / "d.csv", rows(30))
    doc = {
        "name": "toy",
        "domain": "news",
        "task": {"type": "toy_topics"},
        "data": {"source": str(src)},
        "training": {"epochs": 1, "batch_size": 8, "max_length": 32},
        "evaluation": {"test_size": 0.2, "val_size": 0.2},
        "store": {"root": str(tmp_path / "store")},
    }
    config = load_config(data=doc)
    # the config asked the task type: its default model and its first metric
    assert config.model.name_or_path == toy.default_model
    assert config.evaluation.primary_metric == "macro_f1"
    # and its own settings: checked by its options model, the defaults filled in
    assert config.task.options == {"sure_at": 0.5}
    doc["task"] = {"type": "toy_topics", "options": {"sure_at": 0.01}}
    config = load_config(data=doc)
    with pytest.raises(ConfigError, match=r"task\.options\.sure_at: Input should be less than 1"):
        load_config(data={**doc, "task": {"type": "toy_topics", "options": {"sure_at": 2}}})
    with pytest.raises(ConfigError, match=r"task\.options\.surest: Extra inputs"):
        load_config(data={**doc, "task": {"type": "toy_topics", "options": {"surest": 1}}})
    with pytest.raises(ConfigError, match="task type text_classification takes no options"):
        load_config(data={**doc, "task": {"type": "text_classification", "options": {"a": 1}}})
    with pytest.raises(ConfigError, match=r"strategy.head applies to text_classification and "):
        load_config(data={**doc, "training": {"strategy": {"head": {"hidden_sizes": [8]}}}})
    with pytest.raises(ConfigError, match=r"allowed: .*metrics? .*|not a toy_topics metric"):
        load_config(data={**doc, "evaluation": {"primary_metric": "entity_f1"}})
    summary = retrain(config)
    assert summary["version"] == "v0001"  # registered (promotion: the usual rules)
    assert summary["metrics"]["primary_metric"] == "macro_f1"
    assert {"macro_f1", "accuracy"} <= set(summary["metrics"]["finetuned"])
    # domaintune predict serves it through its own predict, no other file touched
    import pandas as pd

    from domaintune.serving.predict import predict
    from domaintune.storage.store import Store

    out = tmp_path / "predictions.parquet"
    said = predict("toy@v0001", [str(src)], str(out), Store(tmp_path / "store"))
    table = pd.read_parquet(out)
    assert len(table) == len(pd.read_csv(src)) and {"predicted", "sure"} <= set(table.columns)
    assert said["task_type"] == "toy_topics"
    card = (tmp_path / "store/registry/toy/v0001/model/README.md").read_text()
    assert "toy_tasks/toy_topics.yaml (built-in)" in card  # the contract it shipped
    assert said["counts"] == {
        "sure": int(table["sure"].sum()),
        "unsure": int((~table["sure"]).sum()),
    }
    # the option reached predict through the registered model's config (sure from 0.01)
    assert table["sure"].all() and said["counts"]["unsure"] == 0


def test_an_unknown_task_type_is_one_line_naming_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(data={"name": "x", "domain": "d", "task": {"type": "sumarization"}, "data": {}})
    msg = str(e.value)
    assert "task.type" in msg and "unknown task type 'sumarization'" in msg
    assert "text_classification" in msg and "masked_lm" in msg
