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
