"""deployments/prefect.yaml stays loadable: entrypoints resolve, parameters are valid configs."""

from pathlib import Path

import yaml

from domaintune.config import validate_config

ROOT = Path(__file__).resolve().parent.parent


def test_every_deployment_points_at_the_flow_with_a_valid_config():
    from prefect.flows import load_flow_from_entrypoint

    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert doc["deployments"]
    for dep in doc["deployments"]:
        path, _, name = dep["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{name}")
        assert flow.name == "retrain"
        cfg = validate_config(dep["parameters"]["config"], origin=dep["name"])
        assert cfg.name == dep["name"]


def test_each_domain_is_scheduled_weekly_and_triggered_by_its_new_data():
    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    by_domain = {d["parameters"]["config"]["domain"]: d for d in doc["deployments"]}
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
