"""Tokens and storage credentials never appear in logs, artifacts, reports, the registry
or run summaries: fake ones are planted in the environment and in a data URL, a real run
(and a failing one) goes through Prefect, and every output is searched for them."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from domaintune.errors import ConfigError, ContractViolation
from domaintune.redaction import redact
from tests.conftest import make_rows
from tests.flows.test_retrain import run_artifacts, run_logs

SECRETS = {
    "HF_TOKEN": "hf_FAKEtokenAbCdEf0123456789xyz",
    "AWS_SECRET_ACCESS_KEY": "FAKEawsSECRETkey/0123456789abcdef",
    "WAREHOUSE_PASSWORD": "n0t-a-real-Passw0rd!",
}
URL_PASSWORD = "FAKEurlPASS9876"


def test_redact_masks_the_usual_shapes(monkeypatch):
    monkeypatch.setenv("SOME_API_KEY", "k-1234567890")
    text = redact(
        "s3://AKIAABCDEFGHIJKLMNOP:wJalrXUtnFEMI@bucket/x.csv "
        "https://host/data.csv?sig=abc123&token=tok456&page=2 "
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30 hf_abcdefghijklmnopqrstu "
        "key k-1234567890 ghp_abcdefghijklmnopqrstuvwxyz0123"
    )
    for leaked in ("wJalrXUtnFEMI", "abc123", "tok456", "eyJhbGci", "hf_abcdefghijklmnop",
                   "k-1234567890", "ghp_abcdefghij"):  # fmt: skip
        assert leaked not in text, text
    assert "s3://***@bucket/x.csv" in text and "page=2" in text


def _texts(root: Path) -> dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and p.suffix not in (".parquet", ".safetensors", ".arrow", ".lock"):
            try:
                out[str(p)] = p.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
    return out


def _assert_clean(where: str, text: str) -> None:
    for secret in (*SECRETS.values(), URL_PASSWORD):
        assert secret not in text, f"{secret!r} leaked into {where}"


@pytest.mark.slow
def test_planted_tokens_appear_in_no_output(tmp_path, make_config, monkeypatch, caplog):
    import logging

    from prefect.logging import get_run_logger  # noqa: F401 - Prefect's loggers exist

    from domaintune.flows.retrain import retrain

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    url = f"memory://reader:{URL_PASSWORD}@bucket/finance.csv"
    rows = make_rows(30)
    with fsspec.open(url, "w") as f:
        f.write("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    caplog.set_level(logging.DEBUG)
    cfg = make_config(url, training={"max_steps": 3, "epochs": 1})
    summary = retrain(cfg)
    assert summary["status"] == "completed" and summary["version"] == "v0001"

    _assert_clean("the run summary", json.dumps(summary))
    for i, msg in enumerate(run_logs(summary["run_id"])):
        _assert_clean(f"Prefect log line {i}", msg)
    for a in run_artifacts(summary["run_id"]):
        _assert_clean(f"artifact {a.description!r}", json.dumps(a.data, default=str))
    for path, text in _texts(Path(cfg.store.root)).items():
        _assert_clean(path, text)
    assert "reader:***" not in caplog.text and URL_PASSWORD not in caplog.text
    lineage = next(Path(cfg.store.root).rglob("lineage.json")).read_text()
    assert "***@bucket/finance.csv" in lineage, "provenance kept, credentials not"

    # a failing run: its error, logs and report say where and why, without the password
    bad = f"memory://reader:{URL_PASSWORD}@bucket/bad.csv"
    with fsspec.open(bad, "w") as f:
        f.write("text,label\n" + "".join(f"{r['text']},postive\n" for r in rows))
    with pytest.raises(ContractViolation) as e:
        retrain(make_config(bad, store={"root": str(tmp_path / "store2")}))
    _assert_clean("the error", str(e.value))
    assert "***@bucket/bad.csv" in str(e.value)
    for path, text in _texts(tmp_path / "store2").items():
        _assert_clean(path, text)
    _assert_clean("the captured logs", caplog.text)


@pytest.mark.slow
def test_credentials_referenced_from_the_environment_stay_out_of_prefect(
    tmp_path, make_config, monkeypatch
):
    """The data lives on an S3 API server that refuses any request not signed with its one
    key; the config references that key as ``${env:...}``. The run reads the data, and the
    secret is nowhere in Prefect's stored parameters, logs, artifacts, the summary or the
    store."""
    from prefect.client.orchestration import get_client

    from domaintune.flows.retrain import retrain
    from domaintune.storage.store import Store
    from domaintune.tasks.ingest import ingest
    from tests.conftest import write_csv
    from tests.services import s3_server_checking_credentials

    with s3_server_checking_credentials(tmp_path / "vault") as vault:
        secret = vault.secret
        vault.fs().mkdir("vault")
        vault.fs().put_file(
            str(write_csv(tmp_path / "finance.csv", make_rows(30))), "vault/finance.csv"
        )
        url = "s3://vault/finance.csv"
        options = {
            "storage_options": {
                "endpoint_url": vault.endpoint,
                "key": "${env:DT_READER_KEY_ID}",
                "secret": "${env:DT_READER_KEY}",
            }
        }
        monkeypatch.setenv("DT_READER_KEY_ID", vault.key)
        cfg = make_config(url, data=options, training={"max_steps": 3, "epochs": 1})

        with pytest.raises(ConfigError) as e:  # written out: refused before anything runs
            make_config(
                url, data={"storage_options": {**options["storage_options"], "secret": secret}}
            )
        assert "data.storage_options.secret: a credential written into the config" in str(e.value)
        assert secret not in str(e.value)
        monkeypatch.delenv("DT_READER_KEY", raising=False)
        with pytest.raises(ConfigError, match=r"data\.storage_options\.secret: environment "
                           r"variable DT_READER_KEY is not set"):  # fmt: skip
            ingest(cfg, Store.of(cfg))

        monkeypatch.setenv("DT_READER_KEY", secret)
        summary = retrain(cfg)
    assert summary["status"] == "completed"
    with get_client(sync_client=True) as client:
        params = json.dumps(client.read_flow_run(summary["run_id"]).parameters, default=str)
    assert "${env:DT_READER_KEY}" in params and secret not in params, "Prefect keeps the reference"
    assert secret not in json.dumps(summary)
    assert secret not in redact(f"opened with secret {secret}"), "read values are masked"
    for i, msg in enumerate(run_logs(summary["run_id"])):
        assert secret not in msg, f"Prefect log line {i}"
    for a in run_artifacts(summary["run_id"]):
        assert secret not in json.dumps(a.data, default=str)
    for path, text in _texts(Path(cfg.store.root)).items():
        assert secret not in text, path
