"""The `domaintune` command as a user runs it: a subprocess with its own temporary Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import write_csv


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # no configured API: the CLI starts Prefect's local server
    return subprocess.run(
        [sys.executable, "-m", "domaintune.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def write_config(path, config, **extra) -> str:
    """A config file as a user would write it, from a validated config plus raw extra keys."""
    doc = config.model_dump(mode="json")
    for section, values in extra.items():
        doc.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.slow
def test_run_json_reports_stages_metrics_and_model_then_everything_cached(
    tmp_path, rows, make_config
):
    src = write_csv(tmp_path / "d.csv", rows(30))
    config = write_config(tmp_path / "c.yaml", make_config(src))
    first = cli("run", config, "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    doc = json.loads(first.stdout)  # stdout holds the JSON object and nothing else
    assert doc["run_id"] and doc["promoted"] is True and os.path.isdir(doc["model_dir"])
    assert [s["name"] for s in doc["stages"]] == [
        "ingest",
        "validate",
        "preprocess",
        "monitor",
        "finetune",
        "evaluate",
        "register",
    ]
    assert all(s["cached"] is False and s["seconds"] >= 0 for s in doc["stages"])
    assert set(doc["metrics"]["finetuned"]) >= {"accuracy", "macro_f1"}
    assert set(doc["metrics"]["base"]) >= {"accuracy", "macro_f1"}
    second = cli("run", config, "--json", "--set", "training.logging_steps=3")
    doc2 = json.loads(second.stdout)
    assert all(s["cached"] for s in doc2["stages"]), doc2["stages"]
    assert doc2["model_dir"] == doc["model_dir"]
    text = cli("run", config)
    assert text.returncode == 0 and "fine-tuned" in text.stdout and "promoted: yes" in text.stdout

    # the score flow on new, unlabelled data with the production model of that store
    new = tmp_path / "incoming.csv"
    new.write_text("text\n" + "\n".join(r["text"] for r in rows(1)) + "\n")
    scored = cli("score", "test-uc@production", str(new), "--config", config, "--json")
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout)
    assert (result["scored"], result["rows"]) == (1, 3)
    assert result["files"][0]["version"] == doc["version"] and result["name"] == "test-uc"
    again = cli("score", "test-uc@production", str(new), "--config", config)
    assert again.returncode == 0 and "(0 scored, 1 cached)" in again.stdout, again.stdout


def test_validate_command_and_exit_codes(tmp_path, rows, make_config):
    good = write_csv(tmp_path / "good.csv", rows(12))
    ok = cli("validate", write_config(tmp_path / "ok.yaml", make_config(good)), "--json")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["status"] == "passed"
    r = rows(12)
    r[2]["label"] = "sideways"
    bad = write_csv(tmp_path / "bad.csv", r)
    failed = cli("validate", write_config(tmp_path / "bad.yaml", make_config(bad)))
    assert failed.returncode == 2
    assert "label_in_set" in failed.stderr and "bad.csv row 3: 'sideways'" in failed.stderr
    assert "report:" in failed.stderr
    # the same file with the bad row quarantined (1 of 36 rows: under 5%)
    quarantined = cli(
        "validate", str(tmp_path / "bad.yaml"), "--set", "data.on_invalid=quarantine", "--json"
    )
    assert quarantined.returncode == 0, quarantined.stderr[-2000:]
    doc = json.loads(quarantined.stdout)
    assert doc["quarantined_rows"] == 1 and doc["quarantine_table"].endswith("quarantine.parquet")
    typo = cli(
        "run",
        write_config(
            tmp_path / "typo.yaml", make_config(good), evaluation={"primery_metric": "accuracy"}
        ),
    )
    assert (
        typo.returncode == 2
        and "evaluation.primery_metric: unknown key; did you mean 'primary_metric'?" in typo.stderr
    )
    # a run on bad data fails in its one-line error, not with Prefect's Python traceback
    run = cli("run", str(tmp_path / "bad.yaml"))
    assert run.returncode == 2 and "bad.csv row 3: 'sideways'" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
