"""Chaining: a fine-tune that starts from a registered model (``model.name_or_path:
registry://NAME@production``, ``@latest``, ``@vNNNN``), with real DeepSpeed launches.

One NER use case is registered once for the module: v0001 a full model, v0002 a LoRA adapter
alone (``merge_on_export: false``) that continues v0001's training (same task and labels:
the head is kept). A sentiment classifier then chains from it: a fresh head, the parent in
its lineage and in its finetune cache key.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from domaintune.chaining import resolve_config_model, resolve_model
from domaintune.errors import ConfigError, ModelError
from domaintune.models import ResolvedModel
from domaintune.registry import Registry
from domaintune.runconfig import load_config
from domaintune.serving.predict import resolve as predict_resolve
from domaintune.storage.store import Store
from domaintune.tasks import finetune as finetune_stage
from domaintune.tasks.evaluate import evaluate
from domaintune.tasks.finetune import finetune
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.register import register
from tests.conftest import (
    LABELS,
    TINY_EVALUATION,
    TINY_TRAINING,
    make_ner_sentences,
    make_rows,
    write_conll,
    write_csv,
)

NER = {"type": "token_classification", "labels": ["PER", "ORG", "LOC"]}
TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
LORA_ADAPTER_ONLY = {"lora": {"r": 4, "alpha": 8, "merge_on_export": False}}


def _config(root: Path, source: Path, name: str, **sections):
    data = {
        "name": name,
        "task": {"type": "text_classification", "labels": LABELS},
        "data": {"source": str(source)},
        "training": {**TINY_TRAINING, "seed": 7, "warmup_ratio": 0.0, "logging_steps": 5},
        "evaluation": TINY_EVALUATION,
        "retries": {"count": 0, "delay_seconds": 0},
        "store": {"root": str(root / "store")},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return load_config(data=data)


def _train_and_register(cfg):
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    splits = preprocess(cfg, raw, store)
    model = finetune(cfg, splits, store)
    evaluation = evaluate(cfg, splits, model, store)
    return splits, model, evaluation, register(cfg, raw, splits, model, evaluation, store)


def _lineage(reg) -> dict:
    return json.loads((Path(reg.path) / "lineage.json").read_text())


@pytest.fixture(scope="module")
def ner(tmp_path_factory, tiny_model):
    """``ner-domain`` v0001 (full model, production) and v0002 (LoRA adapter alone, chained
    from v0001, not promoted), in one store."""
    root = tmp_path_factory.mktemp("chaining")
    src = write_conll(root / "ner.txt", make_ner_sentences(60))
    first = _config(
        root,
        src,
        "ner-domain",
        task=NER,
        data={"format": "conll"},
        model={"name_or_path": str(tiny_model)},
        training={"max_steps": 10},
    )
    *_, v1 = _train_and_register(first)
    store = Store(first.store.root)
    if not v1.promoted:  # the test is about chaining, not about the promotion gate
        Registry(store, "ner-domain").promote(v1.version)
    lora = _config(
        root,
        src,
        "ner-domain",
        task=NER,
        data={"format": "conll"},
        model={"name_or_path": "registry://ner-domain@v0001"},
        training={"max_steps": 6, "strategy": LORA_ADAPTER_ONLY},
        promotion={"min_primary_metric": 2.0},  # never promoted: v0001 stays in production
    )
    splits, lora_model, _, v2 = _train_and_register(lora)
    assert (v1.version, v2.version) == ("v0001", "v0002") and not v2.promoted
    return SimpleNamespace(
        root=root, store=store, v1=v1, v2=v2, lora=lora, lora_model=lora_model, tags=splits.labels
    )


def _fingerprint(folder: str | Path) -> str:
    return ResolvedModel(name="", path=str(folder)).fingerprint()


@pytest.mark.slow
def test_a_classifier_chained_from_a_registered_ner_model(ner, caplog):
    src = write_csv(ner.root / "sentiment.csv", make_rows(20))
    cfg = _config(
        ner.root,
        src,
        "sentiment",
        model={"name_or_path": "registry://ner-domain@production"},
        training={"max_steps": 8},
    )
    store = ner.store
    raw = ingest(cfg, store)
    splits = preprocess(cfg, raw, store)
    with caplog.at_level(logging.INFO, logger="domaintune.tasks.finetune"):
        model = finetune(cfg, splits, store)
    # the NER head (7 tags) does not fit a 3-label classifier: a fresh head, said once
    said = [r.getMessage() for r in caplog.records if "does not fit" in r.getMessage()]
    assert said == [
        "finetune: base model registry://ner-domain@production (v0001): its "
        "BertForTokenClassification head (token_classification, 7 labels: "
        f"{', '.join(TAGS)}) does not fit this text_classification run: dropped, and a fresh "
        "ForSequenceClassification head (3 labels: negative, neutral, positive) is "
        "initialised from training.seed on its encoder"
    ]
    assert not model.reused and model.global_step == 8
    hf = json.loads((Path(model.model_dir) / "config.json").read_text())
    assert hf["architectures"] == ["BertForSequenceClassification"]
    assert list(hf["id2label"].values()) == LABELS
    # the parent's content fingerprint is the base fingerprint of the finetune key
    parent_fp = _fingerprint(Path(ner.v1.model_dir))
    assert model.base_model == "registry://ner-domain@production (v0001)"
    assert model.base_fingerprint == parent_fp
    key, _, base_fp = finetune_stage.plan(cfg, splits)
    assert (key, base_fp) == (model.key, parent_fp)

    # the base model is evaluated with the same fresh head; the lineage names the parent
    evaluation = evaluate(cfg, splits, model, store)
    assert set(evaluation.base["per_class"]) == set(LABELS)
    reg = register(cfg, raw, splits, model, evaluation, store)
    lineage = _lineage(reg)
    assert lineage["base_model"] == {
        "name": "registry://ner-domain@production (v0001)",
        "fingerprint": parent_fp,
        "registry": {
            "reference": "registry://ner-domain@production",
            "use_case": "ner-domain",
            "version": "v0001",
        },
    }
    assert lineage["model"]["labels"] == LABELS
    # predict takes the same references, by the registry's one rule
    assert predict_resolve("registry://sentiment@latest", store).version == reg.version

    # promoting another version changes the key; the same version again is cached
    registry = Registry(store, "ner-domain")
    registry.promote("v0002", "test: another parent")
    try:
        other, base, _ = finetune_stage.plan(cfg, splits)
        assert other != key and base.name == "registry://ner-domain@production (v0002)"
    finally:
        registry.rollback("test: back to v0001")
    assert finetune_stage.plan(cfg, splits)[0] == key
    assert finetune(cfg, splits, store).reused


@pytest.mark.slow
def test_an_adapter_only_lora_version_resolves_to_its_base_plus_the_adapter(ner):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from domaintune.tasktypes import get_task_type

    version = Path(ner.v2.path)
    assert not (version / "model" / "config.json").exists()  # the adapter alone
    base_json = json.loads((version / "model" / "base_model.json").read_text())
    assert base_json["name"] == "registry://ner-domain@v0001"
    # v0002 continued v0001's NER training: same task and labels, so the head was kept
    assert _lineage(ner.v2)["base_model"]["registry"]["version"] == "v0001"
    assert ner.lora_model.base_fingerprint == _fingerprint(ner.v1.model_dir)

    resolved = resolve_model("registry://ner-domain@v0002", store=ner.store)
    assert resolved.name == "registry://ner-domain@v0002"
    assert Path(resolved.path).parent == ner.store.entry_path("models", "x").parent
    assert resolve_model("registry://ner-domain@latest", store=ner.store).path == resolved.path
    # the merged folder scores as v0001 + the adapter does
    merged = AutoModelForTokenClassification.from_pretrained(resolved.path).eval()
    base = get_task_type("token_classification").load_model(
        str(ner.v1.model_dir), ner.tags, ner.lora.training.seed
    )
    with_adapter = PeftModel.from_pretrained(base, str(version / "model")).eval()
    tok = AutoTokenizer.from_pretrained(resolved.path)
    batch = tok(["Anna Berg joined Acme Corp in Oslo ."], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, with_adapter(**batch).logits, atol=1e-5)

    # ... and a new run chains from it (a short one)
    cfg = _config(
        ner.root,
        write_csv(ner.root / "sentiment-lora.csv", make_rows(20, seed=3)),
        "sentiment-from-adapter",
        model={"name_or_path": "registry://ner-domain@v0002"},
        training={"max_steps": 2},
    )
    store = ner.store
    model = finetune(cfg, preprocess(cfg, ingest(cfg, store), store), store)
    assert model.global_step == 2 and model.base_model == "registry://ner-domain@v0002"
    assert model.base_fingerprint == _fingerprint(resolved.path)

    # an adapter whose base is gone: one line naming the reference, the base and the rule
    moved = ner.root / "moved" / "ner-domain" / "v0002"
    shutil.copytree(version, moved)
    gone = {**base_json, "name": str(ner.root / "deleted-base-model")}
    (moved / "model" / "base_model.json").write_text(json.dumps(gone))
    from domaintune.chaining import merged_adapter

    with pytest.raises(ModelError) as exc:
        merged_adapter("registry://ner-domain@v0002", moved, Store(ner.root / "other-store"))
    assert str(exc.value) == (
        "model.name_or_path registry://ner-domain@v0002: a LoRA adapter whose base model "
        f"'{ner.root / 'deleted-base-model'}' (base_model.json) cannot be found "
        f"({ner.root / 'deleted-base-model'} does not exist); rule: an adapter-only version "
        "resolves to the base model it was trained on plus the adapter"
    )


@pytest.mark.slow
def test_a_reference_in_an_object_store_resolves_to_this_hosts_copy(ner, s3_store):
    """The store is S3: the version is downloaded once into this host's cache, and its
    fingerprint is its content's, the same as in the local store it was copied from."""
    store = Store(s3_store["root"], s3_store["storage_options"])
    registry = Registry(store, "ner-domain")
    with registry.lock():
        state = registry.state()
        staged = registry.staging_dir("v0001")
        shutil.copytree(Path(ner.v1.path), staged, dirs_exist_ok=True)
        registry.publish("v0001", staged, {})
        registry.append(state, action="register", version="v0001", promoted=True, registration={})
    shutil.rmtree(registry.cache)  # another host: nothing local yet
    resolved = resolve_model("registry://ner-domain@production", store=store)
    assert resolved.path == str(registry.cache / "v0001" / "model")
    assert resolved.fingerprint() == _fingerprint(ner.v1.model_dir)


# ----------------------------------------------------------------------- heads (no training)


def test_a_head_that_does_not_fit_is_fresh_even_when_its_size_would(tmp_path, tiny_model):
    """A 3-tag NER head has the shape of a 3-label classifier's: loading would keep it
    silently, meaning other labels. Only the same task and label set keep their head."""
    import torch
    from transformers import AutoModelForTokenClassification

    from domaintune.config import TrainingConfig
    from domaintune.loading import load_task_model
    from domaintune.training.strategies import head_change, preflight

    tags = ["O", "B-ORG", "I-ORG"]
    parent = AutoModelForTokenClassification.from_pretrained(
        tiny_model,
        num_labels=3,
        id2label=dict(enumerate(tags)),
        label2id={t: i for i, t in enumerate(tags)},
    )
    with torch.no_grad():
        parent.classifier.weight.fill_(1.0)
    parent.save_pretrained(tmp_path / "ner")
    path = str(tmp_path / "ner")

    fresh = load_task_model("text_classification", path, LABELS, seed=7)
    again = load_task_model("text_classification", path, LABELS, seed=7)
    assert not torch.equal(fresh.classifier.weight, parent.classifier.weight)
    assert torch.equal(fresh.classifier.weight, again.classifier.weight)  # from the seed
    assert torch.equal(  # the encoder is the parent's
        fresh.bert.encoder.layer[1].output.dense.weight,
        parent.bert.encoder.layer[1].output.dense.weight,
    )
    assert head_change(path, "text_classification", LABELS).startswith(
        "its BertForTokenClassification head (token_classification, 3 labels: O, B-ORG, I-ORG)"
    )
    # the same task: kept for the same labels, fresh for others (of the same number)
    kept = load_task_model("token_classification", path, tags, seed=7)
    assert torch.equal(kept.classifier.weight, parent.classifier.weight)
    assert head_change(path, "token_classification", tags) is None
    other = load_task_model("token_classification", path, ["O", "B-PER", "I-PER"], seed=7)
    assert not torch.equal(other.classifier.weight, parent.classifier.weight)
    # pre-flight says it before a launch; a base model without a task head is no news
    assert preflight(TrainingConfig(), path, "text_classification", LABELS)["head"]
    assert (
        preflight(TrainingConfig(), str(tiny_model), "text_classification", LABELS)["head"] is None
    )


# ---------------------------------------------------------------- bad references (no training)


@pytest.fixture
def log_only_registry(tmp_path):
    """A store whose registry log holds ``ner-domain`` v0001, registered and not promoted."""
    store = Store(tmp_path / "store")
    registry = Registry(store, "ner-domain")
    with registry.lock():
        registry.append(
            registry.state(),
            action="register",
            version="v0001",
            promoted=False,
            registration={"version": "v0001"},
        )
    return store


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (
            "registry://nope@production",
            "model.name_or_path registry://nope@production: no use case 'nope' in the registry "
            "of {store} (registered: ner-domain)",
        ),
        (
            "registry://ner-domain@v0042",
            "model.name_or_path registry://ner-domain@v0042: 'ner-domain' has no version "
            "'v0042' (versions: v0001; or @production, @latest)",
        ),
        (
            "registry://ner-domain@production",
            "model.name_or_path registry://ner-domain@production: no version of 'ner-domain' "
            "is in production (versions: v0001; promote one with `domaintune models promote`)",
        ),
    ],
)
def test_a_reference_the_registry_cannot_resolve_is_one_line(
    log_only_registry, make_config, reference, expected
):
    cfg = make_config(
        "unused.csv",
        model={"name_or_path": reference},
        store={"root": log_only_registry.url},
    )
    with pytest.raises(ModelError) as exc:
        resolve_config_model(cfg)
    assert str(exc.value) == expected.format(store=log_only_registry.url_of())


def test_a_reference_in_a_store_without_a_registry_is_one_line(tmp_path, make_config, rows):
    """Where the run meets it: the first stage that resolves the model (preprocess), which
    the flow does not retry (a ModelError: exit code 2)."""
    cfg = make_config(
        write_csv(tmp_path / "d.csv", rows(12)),
        model={"name_or_path": "registry://ner-domain@production"},
    )
    store = Store(cfg.store.root)
    with pytest.raises(ModelError) as exc:
        preprocess(cfg, ingest(cfg, store), store)
    assert str(exc.value) == (
        f"model.name_or_path registry://ner-domain@production: the store {store.url_of()} has "
        "no registry (no use case registered there yet); rule: a registry reference names a "
        "use case registered in the same store (store.root)"
    )


@pytest.mark.slow
def test_a_run_pins_production_to_one_version_before_any_stage(ner, tmp_path, make_config):
    """The retrain flow pins registry://NAME@production once (chaining.pin), so a promotion
    during a run cannot give its stages different parents; a bad reference fails there."""
    from domaintune.chaining import pin

    cfg = _config(ner.root, "unused.csv", "sentiment", model={"name_or_path": "registry://ner-domain@production"})  # fmt: skip
    assert pin(cfg, ner.store).model.name_or_path == "registry://ner-domain@v0001"
    assert cfg.model.name_or_path == "registry://ner-domain@production", "the config is not changed"
    registry = Registry(ner.store, "ner-domain")
    registry.promote("v0002", "test: another parent")
    try:
        assert pin(cfg, ner.store).model.name_or_path == "registry://ner-domain@v0002"
    finally:
        registry.rollback("test: back to v0001")
    pinned = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": "registry://ner-domain@v0001"})})  # fmt: skip
    assert pin(pinned, ner.store) is pinned
    plain = make_config("unused.csv")
    assert pin(plain, ner.store) is plain
    missing = make_config("unused.csv", model={"name_or_path": "registry://nope@production"})
    with pytest.raises(ModelError, match=r"^model.name_or_path registry://nope@production: "):
        pin(missing, ner.store)


def test_a_malformed_reference_fails_when_the_config_loads(make_config):
    with pytest.raises(ConfigError) as exc:
        make_config("unused.csv", model={"name_or_path": "registry://ner-domain"})
    assert (
        "model.name_or_path: Value error, malformed registry reference; rule: "
        "registry://NAME@production, registry://NAME@latest or registry://NAME@vNNNN "
        "(got 'registry://ner-domain')"
    ) in str(exc.value)
