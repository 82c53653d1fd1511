import pytest

from domaintune.config import RetrainConfig
from domaintune.errors import ConfigError
from domaintune.runconfig import load_config

MINIMAL = {"name": "uc", "data": {"source": "data.csv"}}


def test_minimal_config_gets_documented_defaults():
    cfg = load_config(data=MINIMAL)
    assert cfg.task.type == "text_classification"
    assert cfg.data.encoding == "auto"
    assert cfg.data.format is None
    assert cfg.training.deepspeed.zero_stage == 2
    assert cfg.evaluation.primary_metric == "accuracy"
    assert cfg.model.trust_remote_code is False
    assert cfg.store.root == "./.domaintune"


def test_public_keys_exist_with_their_names():
    cfg = load_config(
        data={
            **MINIMAL,
            "domain": "finance",
            "task": {"type": "text_classification", "labels": ["a", "b"]},
            "data": {
                "source": "x.csv",
                "format": "csv",
                "encoding": "cp1252",
                "text_column": "t",
                "label_column": "l",
            },
            "model": {"name_or_path": "some/model"},
            "training": {
                "epochs": 1,
                "max_steps": 5,
                "learning_rate": 1e-4,
                "batch_size": 4,
                "max_length": 64,
                "seed": 1,
                "deepspeed": {"zero_stage": 3},
            },
            "evaluation": {"test_size": 0.2, "val_size": 0.1, "primary_metric": "macro_f1"},
            "store": {"root": "/tmp/x"},
        }
    )
    assert cfg.training.deepspeed.zero_stage == 3 and cfg.evaluation.primary_metric == "macro_f1"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(data={**MINIMAL, "training": {"epoch": 3}})
    msg = str(e.value)
    assert "training.epoch: unknown key" in msg
    assert "did you mean 'epochs'" in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(data={**MINIMAL, "data": {"source": "x", "format": "xlsx"}})
    msg = str(e.value)
    assert "data.format" in msg and "'csv'" in msg and "'jsonl'" in msg and "'parquet'" in msg
    with pytest.raises(ConfigError) as e:
        load_config(data={**MINIMAL, "training": {"deepspeed": {"zero_stage": 4}}})
    assert "training.deepspeed.zero_stage" in str(e.value)


def test_primary_metric_must_belong_to_the_task():
    with pytest.raises(ConfigError) as e:
        load_config(data={**MINIMAL, "evaluation": {"primary_metric": "bleu"}})
    assert "accuracy, macro_f1, weighted_f1" in str(e.value)


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError) as e:
        load_config(data={"name": "uc"})
    assert "data: required key is missing" in str(e.value)
    with pytest.raises(ConfigError, match="exactly one of data.source and data.splits"):
        load_config(data={"name": "uc", "data": {"text_column": "t"}})
    with pytest.raises(ConfigError, match="needs at least `train` and `test`"):
        load_config(data={"name": "uc", "data": {"splits": {"train": "a.csv"}}})


def test_set_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: uc\ndata:\n  source: d.csv\n")
    cfg = load_config(
        p,
        [
            "training.epochs=1",
            "training.max_steps=7",
            "task.labels=[x, y]",
            "training.deepspeed.zero_stage=0",
        ],
    )
    assert cfg.training.epochs == 1 and cfg.training.max_steps == 7
    assert cfg.task.labels == ["x", "y"] and cfg.training.deepspeed.zero_stage == 0
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(p, ["training.epochs"])


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(data={"name": "uc", "data": {"source": "in/*.csv"}, "store": {"root": "st"}})
    assert cfg.data.source == str(tmp_path / "in" / "*.csv")
    assert cfg.store.root == str(tmp_path / "st")
    url = load_config(data={"name": "uc", "data": {"source": "s3://bucket/x.csv"}})
    assert url.data.source == "s3://bucket/x.csv"


def test_config_is_a_json_schema_for_the_prefect_form():
    schema = RetrainConfig.model_json_schema()
    assert "data" in schema["required"]
    assert schema["$defs"]["DataConfig"]["properties"]["format"]["anyOf"][0]["enum"] == [
        "csv",
        "jsonl",
        "parquet",
        "text",
        "conll",
        "tmx",
    ]
