"""deployments/prefect.yaml stays loadable: entrypoints resolve, parameters are valid configs."""

from pathlib import Path

import yaml

from domaintune.runconfig import validate_config
from domaintune.tasks.score import ScoreConfig

ROOT = Path(__file__).resolve().parent.parent


def _deployments(flow: str | None = None) -> list[dict]:
    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert doc["deployments"]
    return [d for d in doc["deployments"] if flow is None or d["entrypoint"].endswith(f":{flow}")]


def test_every_deployment_points_at_its_flow_with_a_valid_config():
    from prefect.flows import load_flow_from_entrypoint

    retrain = {d["name"] for d in _deployments("retrain")}
    for dep in _deployments():
        path, _, name = dep["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{name}")
        assert flow.name in ("retrain", "score", "tune")
        if flow.name in ("retrain", "tune"):
            cfg = validate_config(dep["parameters"]["config"], origin=dep["name"])
            assert cfg.name == dep["name"].removesuffix("-tune")
        else:
            cfg = ScoreConfig.model_validate(dep["parameters"]["config"])
            assert cfg.name == dep["name"]
            assert cfg.model.split("@") == [dep["name"].removesuffix("-score"), "production"]
            assert cfg.model.split("@")[0] in retrain, "scores with a use case deployed here"


def test_each_domain_is_scheduled_weekly_and_triggered_by_its_new_data():
    by_domain = {d["parameters"]["config"]["domain"]: d for d in _deployments("retrain")}
    assert {"finance", "healthcare", "ecommerce"} <= set(by_domain)
    for domain in ("finance", "healthcare", "ecommerce"):
        dep = by_domain[domain]
        assert dep["work_pool"]["name"] == "domaintune"
        assert dep["schedules"][0]["cron"] == "0 3 * * 1" and dep["schedules"][0]["active"]
        (trigger,) = dep["triggers"]
        assert trigger["match"]["prefect.resource.id"] == f"domaintune.domain.{domain}"
        assert trigger["expect"] == ["domaintune.data.arrived"]
        assert domain in dep["tags"]
        source = dep["parameters"]["config"]["data"]["source"]
        assert source.startswith(f"landing/{domain}/"), "trains on the domain's landing zone"


def test_each_domain_scores_its_incoming_folder_daily_and_when_files_arrive():
    scoring = {d["tags"][0]: d for d in _deployments("score")}
    assert set(scoring) == {"finance", "healthcare", "ecommerce"}
    for domain, dep in scoring.items():
        assert dep["schedules"][0]["cron"] == "0 6 * * *" and dep["schedules"][0]["active"]
        (trigger,) = dep["triggers"]
        assert trigger["match"]["prefect.resource.id"] == f"domaintune.domain.{domain}-incoming"
        assert dep["concurrency_limit"]["limit"] == 1
        source = dep["parameters"]["config"]["source"]
        assert source.startswith(f"landing/{domain}-incoming/"), "not the training data"


def test_each_domain_has_a_tune_deployment_of_its_retrain_config_started_by_hand():
    retrain = {d["name"]: d for d in _deployments("retrain")}
    tuning = {d["tags"][0]: d for d in _deployments("tune")}
    assert set(tuning) == {"finance", "healthcare", "ecommerce"}
    for domain, dep in tuning.items():
        use_case = dep["name"].removesuffix("-tune")
        assert dep["parameters"]["config"] == retrain[use_case]["parameters"]["config"]
        assert dep["parameters"]["config"]["domain"] == domain
        assert dep["parameters"]["trials"] >= 1
        assert "schedules" not in dep and "triggers" not in dep, "a search is started by hand"
        assert dep["concurrency_limit"]["limit"] == 1
