"""Multi-stage recipes (domaintune.recipes): stages merged onto the config, chained model to
model, each cached and evaluated, only the last registered, no stage trained on the final
stage's held-out text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from domaintune.errors import ConfigError
from domaintune.recipes import stage_configs
from tests.conftest import write_csv


def recipe(make_config, first: Path, second: Path, classify=None, **stage_changes):
    """masked_lm on the first file's text -> classifier -> attention only on a second
    labelled file."""
    stages = [
        {
            "name": "dapt",
            "task": {"type": "masked_lm"},
            "training": {"learning_rate": 1e-3, "max_steps": 6},
        },
        {"name": "classify", **({"training": classify} if classify else {})},
        {
            "name": "attention",
            "data": {"source": str(second)},
            "training": {"strategy": {"kind": "components", "components": ["attention", "head"]}},
        },
    ]
    for name, change in stage_changes.items():
        stage = next(s for s in stages if s["name"] == name)
        stage["training"] = {**stage.get("training", {}), **change}
    # the chain and its caching are what is tested here, not how well tiny models learn
    return make_config(first, training={"max_steps": 8}, stages=stages)


def test_each_stage_is_the_config_with_its_sections_merged_on(tmp_path, make_config):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    top = {"strategy": {"kind": "last_n_layers", "last_n_layers": 1}}
    cfg = recipe(make_config, first, second, classify=top)
    dapt, classify, attention = stage_configs(cfg)
    assert [s.name for s in (dapt, classify, attention)] == ["dapt", "classify", "attention"]
    assert [s.final for s in (dapt, classify, attention)] == [False, False, True]
    # another task type: its default metric, the labels of its own data
    assert dapt.config.task.type == "masked_lm" and dapt.config.task.labels is None
    assert dapt.config.evaluation.primary_metric == "perplexity"
    assert dapt.config.training.max_steps == 6 and classify.config.training.max_steps == 8
    assert dapt.config.training.batch_size == 8
    assert classify.config.task.labels == cfg.task.labels
    assert classify.config.training.strategy.last_n_layers == 1
    assert classify.config.data.source == str(first)
    assert attention.config.data.source == str(second)
    assert attention.config.training.strategy.kind == "components"
    # only the last stage is the use case (registered); earlier ones evaluate apart
    assert (dapt.config.name, attention.config.name) == ("test-uc.dapt", "test-uc")
    assert dapt.config.tracking.experiment == "test-uc"
    assert dapt.label("finetune") == "dapt-finetune" and attention.label("finetune") == "finetune"
    assert all(s.config.stages is None for s in (dapt, classify, attention))
    # a one-stage config is its own single stage
    (only,) = stage_configs(make_config(first))
    assert only.final and only.name is None and only.label("ingest") == "ingest"


@pytest.mark.parametrize(
    "stages, said",
    [
        ([], "stages: an empty list"),
        ([{"task": {"type": "masked_lm"}}], r"stages\[0\].name: required"),
        ([{"name": "a"}, {"name": "a"}], r"stages\[1\].name: 'a' is used twice"),
        ([{"name": "a", "store": {"root": "/x"}}], r"stages\[0\] \(a\).store: set once"),
        (
            [{"name": "a"}, {"name": "b", "model": {"name_or_path": "x/y"}}],
            r"stages\[1\] \(b\).model.name_or_path: a later stage starts from the model",
        ),
        (
            [{"name": "a", "training": {"learning_rat": 1}}, {"name": "b"}],
            r"stages\[0\] \(a\): training.learning_rat: unknown key; did you mean 'learning_rate'",
        ),
        (
            [
                {
                    "name": "a",
                    "task": {"type": "masked_lm"},
                    "evaluation": {"primary_metric": "accuracy"},
                }
            ],
            r"stages\[0\] \(a\): .*primary_metric 'accuracy' is not a masked_lm metric",
        ),
    ],
)
def test_a_recipe_that_cannot_run_fails_at_load_naming_the_stage(
    tmp_path, make_config, stages, said
):
    with pytest.raises(ConfigError, match=said) as e:
        make_config(tmp_path / "a.csv", stages=stages)
    assert len([ln for ln in str(e.value).splitlines() if "stages" in ln]) == 1, str(e.value)


def test_stage_paths_are_resolved_like_the_config_s(tmp_path, monkeypatch):
    from domaintune.runconfig import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        data={
            "name": "x",
            "data": {"source": "a.csv"},
            "stages": [{"name": "one"}, {"name": "two", "data": {"source": "more/b.csv"}}],
        }
    )
    assert stage_configs(cfg)[1].config.data.source == str(tmp_path / "more" / "b.csv")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_stages_chain_are_cached_and_only_the_last_is_registered(tmp_path, make_config, rows):
    from domaintune.flows.retrain import retrain
    from domaintune.registry import Registry
    from domaintune.storage.store import Store
    from domaintune.tasks.preprocess import split_parts

    labelled = rows(12)
    first = write_csv(tmp_path / "news.csv", labelled)
    # the second set shares some sentences with the first: its held-out ones stay out of the
    # earlier stages, which read the first file
    second = write_csv(tmp_path / "more.csv", labelled[:12] + rows(12, seed=5))
    cfg = recipe(make_config, first, second)
    summary = retrain(cfg)
    names = [s["name"] for s in summary["stages"]]
    assert names == [
        "dapt-ingest", "dapt-validate", "classify-ingest", "classify-validate",
        "ingest", "validate",
        "dapt-preprocess", "dapt-finetune", "dapt-evaluate",
        "classify-preprocess", "classify-finetune", "classify-evaluate",
        "preprocess", "monitor", "finetune", "evaluate", "register",
    ]  # fmt: skip
    assert not any(s["cached"] for s in summary["stages"] if s["name"].endswith("finetune"))
    assert summary["version"] == "v0001"
    assert [r["stage"] for r in summary["recipe"]] == ["dapt", "classify"]
    dapt, classify = summary["recipe"]
    assert dapt["task"] == "masked_lm" and dapt["evaluation"]["primary_metric"] == "perplexity"
    assert classify["evaluation"]["primary_metric"] == "accuracy"
    # each stage starts from the one before: the stage's base is the previous model
    assert classify["base_model"]["name"] == f"store://finetune/{dapt['model']['key']}"
    assert classify["base_model"]["fingerprint"] == dapt["model"]["fingerprint"]

    store = Store(cfg.store.root)
    registry = Registry(store, "test-uc")
    assert Registry(store, "test-uc.dapt").state().versions == {}  # earlier stages: not registered
    folder = registry.version_dir("v0001")
    lineage = json.loads((folder / "lineage.json").read_text())
    assert [s["stage"] for s in lineage["stages"]] == ["dapt", "classify"]
    assert lineage["base_model"]["name"] == f"store://finetune/{classify['model']['key']}"
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert [s["name"] for s in saved["stages"]] == ["dapt", "classify", "attention"]

    # the final stage's validation and test sentences are in no earlier stage's data
    final = stage_configs(cfg)[-1].config
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.validate import validate

    raw = ingest(final, store)
    parts, _ = split_parts(final, raw, validate(final, raw, store))
    held = {t for n in ("validation", "test") for t in parts[n]["text"]}
    overlap = held & {r["text"] for r in labelled}
    assert overlap, "the test data must exercise the rule"
    assert dapt["held_out_of_final_stage"] == classify["held_out_of_final_stage"] == len(overlap)

    # a change to stage 2 reuses stage 1 and retrains stages 2 and 3
    again = retrain(recipe(make_config, first, second, classify={"learning_rate": 4e-3}))
    cached = {s["name"]: s["cached"] for s in again["stages"]}
    assert all(v for k, v in cached.items() if k.startswith("dapt-")), cached
    assert all(cached[k] for k in ("classify-ingest", "classify-validate", "classify-preprocess"))
    assert not cached["classify-finetune"] and not cached["finetune"], cached
    assert again["recipe"][0]["model"]["key"] == dapt["model"]["key"]
    assert again["version"] == "v0002"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_broken_stage_fails_before_anything_trains(tmp_path, make_config, rows):
    from domaintune.errors import ContractViolation
    from domaintune.flows.retrain import retrain
    from tests.test_cli import cli, write_config

    first = write_csv(tmp_path / "news.csv", rows(12))
    fine = cli("validate", write_config(tmp_path / "ok.yaml", recipe(make_config, first, first)))
    assert fine.returncode == 0, fine.stderr[-2000:]
    assert [ln.split(":")[0] for ln in fine.stdout.splitlines() if "contract passed" in ln] == [
        "test-uc stage dapt (masked_lm)",
        "test-uc stage classify (text_classification)",
        "test-uc stage attention (text_classification)",
    ]
    broken = rows(12, seed=5)
    broken[2]["label"] = "sideways"
    cfg = recipe(make_config, first, write_csv(tmp_path / "more.csv", broken))
    said = cli("validate", write_config(tmp_path / "bad.yaml", cfg), "--json")
    assert said.returncode == 2
    error = json.loads(said.stdout)["error"]
    assert error.startswith("stage attention: ") and "more.csv row 3: 'sideways'" in error, error
    # the flow checks the last stage's data before the first stage trains
    with pytest.raises(ContractViolation, match="more.csv row 3"):
        retrain(cfg)
    finetuned = Path(cfg.store.root) / "finetune"
    assert not finetuned.exists() or not [p for p in finetuned.iterdir() if p.name[0] != "."]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_search_of_a_recipe_tunes_its_last_stage(tmp_path, make_config, rows):
    from domaintune.flows.tune import tune

    first = write_csv(tmp_path / "news.csv", rows(12))
    stages = [
        {"name": "dapt", "task": {"type": "masked_lm"}, "training": {"learning_rate": 1e-3}},
        {"name": "classify"},
    ]
    space = {"training.learning_rate": {"choices": [5e-3, 1e-2]}}
    cfg = make_config(
        first,
        training={"max_steps": 4},
        stages=stages,
        tune={"trials": 2, "sampler": "random", "pruner": "none", "space": space},
    )
    summary = tune(cfg)
    names = [s["name"] for s in summary["stages"]]
    assert names[:6] == [
        "dapt-ingest", "dapt-validate", "ingest", "validate", "dapt-preprocess", "dapt-finetune",
    ]  # fmt: skip
    assert names[-3:] == ["finetune", "evaluate", "register"]
    assert [t["state"] for t in summary["trials"]] == ["complete", "complete"], summary["trials"]
    (dapt,) = summary["recipe"]
    assert dapt["stage"] == "dapt" and summary["version"] == "v0001"
    from domaintune.registry import Registry
    from domaintune.storage.store import Store

    folder = Registry(Store(cfg.store.root), "test-uc").version_dir("v0001")
    lineage = json.loads((folder / "lineage.json").read_text())
    assert [s["stage"] for s in lineage["stages"]] == ["dapt"]
    assert lineage["base_model"]["name"] == f"store://finetune/{dapt['model']['key']}"
