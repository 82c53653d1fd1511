"""finetune -> evaluate -> register as plain functions (no Prefect), with real DeepSpeed launches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.storage.store import Store
from domaintune.tasks.evaluate import evaluate
from domaintune.tasks.finetune import finetune
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.register import register
from domaintune.training.allocator import find_tcmalloc
from tests.conftest import write_csv
from tests.test_modelcard import assert_registered_card

pytestmark = pytest.mark.slow


def _stages(cfg):
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    splits = preprocess(cfg, raw, store)
    return store, raw, splits


def test_early_stopping_and_a_model_that_is_not_better_is_not_promoted(tmp_path, make_config, rows):
    src = write_csv(tmp_path / "d.csv", rows(30))
    # a learning rate too small to change anything: validation never improves
    cfg = make_config(
        src, training={"learning_rate": 1e-12, "epochs": 6, "early_stopping_patience": 1}
    )
    store, raw, splits = _stages(cfg)
    model = finetune(cfg, splits, store)
    steps_per_epoch = -(-splits.splits["train"].rows // cfg.training.batch_size)
    assert model.global_step == 2 * steps_per_epoch, (
        "stopped after one evaluation without improvement"
    )
    summary = json.loads((Path(model.model_dir) / "training_summary.json").read_text())
    assert summary["global_step"] < 6 * steps_per_epoch
    # a CPU rank trains with TCMalloc where it is installed, and says which allocator it had
    expected = "tcmalloc (" if find_tcmalloc() else "system malloc (TCMalloc not found"
    assert summary["allocator"].startswith(expected)
    assert model.launch.allocator == summary["allocator"]
    evaluation = evaluate(cfg, splits, model, store)
    curves = (Path(evaluation.path) / "loss_curve.svg").read_text()  # the report's chart
    for name in ("validation loss", f"validation {evaluation.primary_metric}", "learning rate"):
        assert f">{name}</text>" in curves, f"the training curves show the {name}"
    assert set(evaluation.finetuned["per_class"]) == {"negative", "neutral", "positive"}
    assert sum(map(sum, evaluation.finetuned["confusion_matrix"]["matrix"])) == evaluation.test_rows
    reg = register(cfg, raw, splits, model, evaluation, store)
    assert not reg.promoted and "does not beat the base model" in reg.promotion_reason
    registry = Path(reg.registry_dir)
    assert (registry / "latest").read_text() == reg.version
    assert not (registry / "production").exists()


def _full_disk(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_better_model_is_registered_once_and_promoted(tmp_path, make_config, rows, monkeypatch):
    src = write_csv(tmp_path / "d.csv", rows(30))
    cfg = make_config(src)
    store, raw, splits = _stages(cfg)
    model = finetune(cfg, splits, store)
    assert (Path(model.model_dir) / "model.safetensors").is_file()
    assert model.trainable_parameters == model.total_parameters > 0
    evaluation = evaluate(cfg, splits, model, store)
    assert evaluation.finetuned["accuracy"] > evaluation.base["accuracy"]
    # the models were scored in the precision they were trained in
    scored = json.loads(Path(evaluation.metrics_json).read_text())["precision"]
    assert scored["precision"] == model.launch.precision and scored["reason"]
    assert evaluate(cfg, splits, model, store).reused

    # the disk fills up while the version is written, then while the registry's log commits
    # it: a clear error each time, and no version, no pointer, nothing half-registered
    from domaintune import registry as registry_module
    from domaintune.errors import StoreError
    from domaintune.tasks import register as register_module

    real_create = registry_module.create_exclusive
    for module, target, fake in (
        (register_module.shutil, "copy2", _full_disk),
        (registry_module, "create_exclusive",
         lambda fs, p, d: _full_disk() if "/log/" in p else real_create(fs, p, d)),
    ):  # fmt: skip
        with monkeypatch.context() as m:
            m.setattr(module, target, fake)
            with pytest.raises(StoreError, match="no space left on device"):
                register(cfg, raw, splits, model, evaluation, store, flow_run_id="run-0")
        registry = registry_module.Registry(store, cfg.name).cache
        assert not [p.name for p in registry.iterdir() if p.name.startswith(("v", ".tmp"))]
        assert not (registry / "production").exists() and not (registry / "latest").exists()
        assert registry_module.Registry(store, cfg.name).state().versions == {}

    reg = register(cfg, raw, splits, model, evaluation, store, flow_run_id="run-1")
    assert reg.promoted and reg.version == "v0001"
    assert (Path(reg.registry_dir) / "production").read_text() == "v0001"
    lineage = json.loads((Path(reg.path) / "lineage.json").read_text())
    assert lineage["prefect_flow_run_id"] == "run-1"
    assert lineage["code_version"]["domaintune"]
    assert lineage["base_model"]["fingerprint"] == model.base_fingerprint
    assert_registered_card(Path(reg.path))  # model/README.md: parses, metrics, plain loading
    again = register(cfg, raw, splits, model, evaluation, store, flow_run_id="run-2")
    assert again.reused and again.version == "v0001"


CUSTOM_CODE = """
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast


class CustomConfig(BertConfig):
    model_type = "domaintune-custom-bert"


class CustomForSequenceClassification(BertForSequenceClassification):
    config_class = CustomConfig


class CustomTokenizerFast(BertTokenizerFast):
    slow_tokenizer_class = None
"""


def test_a_model_with_its_own_code_loads_the_same_way_in_every_stage(
    tmp_path, make_config, rows, tiny_model
):
    """``model.trust_remote_code``: an architecture and tokenizer shipped as code in the
    model folder (``auto_map``) load with the user's consent in preprocess, in the training
    worker and in evaluation alike (the worker and evaluation loaded the tokenizer without
    it, and failed)."""
    import shutil

    folder = tmp_path / "custom-model"
    shutil.copytree(tiny_model, folder)
    (folder / "custom.py").write_text(CUSTOM_CODE)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "domaintune-custom-bert"
    cfg["auto_map"] = {
        "AutoConfig": "custom.CustomConfig",
        "AutoModelForSequenceClassification": "custom.CustomForSequenceClassification",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg.pop("tokenizer_class", None)
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, "custom.CustomTokenizerFast"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    src = write_csv(tmp_path / "d.csv", rows(20))
    config = make_config(
        src, model={"name_or_path": str(folder), "trust_remote_code": True}, training={"epochs": 1}
    )
    store, _, splits = _stages(config)
    model = finetune(config, splits, store)
    report = evaluate(config, splits, model, store)
    assert 0.0 <= report.finetuned["accuracy"] <= 1.0 and report.base["accuracy"] is not None
