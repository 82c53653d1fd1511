"""The store on a real S3 API server (moto's server mode on 127.0.0.1) as the single source
of truth: two hosts (two local caches) share entries, the registry and its pointers, the
checkpoints of a training in progress; a host's cache can be deleted without losing or
recomputing anything; bad credentials and an unreachable store give one clear line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from domaintune.errors import StoreAccessError, StoreError, TrainingFailed
from domaintune.registry import Registry
from domaintune.storage.store import Store
from domaintune.tasks import finetune as finetune_stage
from domaintune.tasks.evaluate import evaluate
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.register import register
from domaintune.tasks.validate import validate
from domaintune.training.checks import max_weight_difference
from tests.conftest import write_csv


def _host(monkeypatch, tmp_path: Path, name: str) -> Path:
    """Act as another host from now on: its own local cache."""
    cache = tmp_path / f"host-{name}" / "cache"
    monkeypatch.setenv("DOMAINTUNE_CACHE", str(cache))
    return cache


def _run(cfg) -> dict:
    store = Store.of(cfg)
    raw = ingest(cfg, store)
    validation = validate(cfg, raw, store)
    splits = preprocess(cfg, raw, store, validation=validation)
    model = finetune_stage.finetune(cfg, splits, store)
    evaluation = evaluate(cfg, splits, model, store)
    reg = register(cfg, raw, splits, model, evaluation, store, flow_run_id="run")
    return {
        "stages": {
            "ingest": raw.reused,
            "validate": validation.reused,
            "preprocess": splits.reused,
            "finetune": model.reused,
            "evaluate": evaluation.reused,
            "register": reg.reused,
        },
        "evaluation": evaluation,
        "registration": reg,
        "model": model,
    }


@pytest.mark.slow
def test_two_hosts_share_entries_registry_and_champion_and_a_cache_is_disposable(
    tmp_path, monkeypatch, make_config, rows, s3, s3_store, capsys
):
    src = write_csv(tmp_path / "d.csv", rows(30))
    cfg = make_config(src, store=s3_store)
    fs = s3.fs()
    root = s3_store["root"][len("s3://") :]

    cache_a = _host(monkeypatch, tmp_path, "a")
    a = _run(cfg)
    assert not any(a["stages"].values()), "host A computed every stage"
    reg = a["registration"]
    assert reg.promoted and reg.version == "v0001"
    assert reg.model_dir == f"{s3_store['root']}/registry/test-uc/v0001/model"
    # the registry lives in the bucket: version, log, pointers
    assert fs.cat_file(f"{root}/registry/test-uc/production") == b"v0001"
    assert fs.cat_file(f"{root}/registry/test-uc/latest") == b"v0001"
    assert fs.exists(f"{root}/registry/test-uc/v0001/model/model.safetensors")
    assert fs.exists(f"{root}/registry/test-uc/v0001/registration.json")
    # the model card is written into the staged folder: uploaded, not a server-side copy
    assert b"model-index:" in fs.cat_file(f"{root}/registry/test-uc/v0001/model/README.md")
    assert json.loads(fs.cat_file(f"{root}/registry/test-uc/log/000001.json"))["action"] == (
        "register"
    )
    assert not fs.exists(f"{root}/finetune/.work"), "checkpoints are cleared once stored"

    # host B: every stage reused from S3, the same version, no second registration
    _host(monkeypatch, tmp_path, "b")
    b = _run(cfg)
    assert all(b["stages"].values()), b["stages"]
    assert b["registration"].version == "v0001"

    # host B trains something else; the store fails while the new version is copied in: a
    # clear error, and no version, no pointer move, no claim left behind
    other = make_config(src, store=s3_store, training={"epochs": 3})

    def broken_copy(*args, **kwargs):
        raise ConnectionError("Connection was closed before we received a valid response")

    store_fs = Store.of(other).fs  # fsspec hands every Store of this root the same instance
    with monkeypatch.context() as m:
        m.setattr(store_fs, "copy", broken_copy)
        with pytest.raises(StoreError, match=r"registry s3://.*: writing v0002: .*Connection"):
            _run(other)
    state = Registry(Store.of(cfg), "test-uc").state()
    assert list(state.versions) == ["v0001"] and state.production == "v0001"
    assert not fs.exists(f"{root}/registry/test-uc/v0002")
    assert not fs.exists(f"{root}/registry/test-uc/claims/v0002.json")
    assert fs.cat_file(f"{root}/registry/test-uc/latest") == b"v0001"

    # ... and host A's champion is what it is compared against
    b2 = _run(other)
    assert b2["evaluation"].champion["version"] == "v0001"
    assert b2["evaluation"].champion["metrics"]["accuracy"] == pytest.approx(
        reg.metrics["accuracy"]
    )
    assert b2["registration"].version == "v0002"
    state = Registry(Store.of(cfg), "test-uc").state()
    assert list(state.versions) == ["v0001", "v0002"]
    assert [e["action"] for e in state.events] == ["register", "register"]

    # host A loses its whole cache: nothing is lost, nothing is recomputed
    shutil.rmtree(cache_a)
    _host(monkeypatch, tmp_path, "a")
    again = _run(cfg)
    assert all(again["stages"].values()), again["stages"]
    assert again["registration"].version == "v0001"
    # ... and the registry commands read the bucket
    from domaintune.cli import main as cli
    from tests.test_cli import write_config

    path = write_config(tmp_path / "c.yaml", cfg)
    capsys.readouterr()
    assert cli(["models", "list", "test-uc", "--config", path, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["status"]) for r in listed][0] == ("v0001", "champion")


@pytest.mark.slow
def test_training_lost_on_one_host_resumes_on_another_from_checkpoints_in_the_store(
    tmp_path, monkeypatch, make_config, rows, s3, s3_store
):
    """Host A's training dies after its checkpoint at step 4; host B (an empty cache) resumes
    from that checkpoint, downloaded from S3, and ends with the weights of a run that was
    never interrupted (same global batch, same data order: differences < 1e-5)."""
    src = write_csv(tmp_path / "d.csv", rows(30))
    training = {"max_steps": 10, "checkpoint_every_steps": 2}
    cfg = make_config(src, store=s3_store, training=training)

    _host(monkeypatch, tmp_path, "a")
    store = Store.of(cfg)
    splits = preprocess(cfg, ingest(cfg, store), store)
    monkeypatch.setenv("DOMAINTUNE_FAULT_EXIT_AFTER_STEP", "4")
    with pytest.raises(TrainingFailed):
        finetune_stage.finetune(cfg, splits, store)
    monkeypatch.delenv("DOMAINTUNE_FAULT_EXIT_AFTER_STEP")
    key, _, _ = finetune_stage.plan(cfg, splits)
    fs = s3.fs()
    work = f"{s3_store['root'][len('s3://') :]}/finetune/.work/{key}"
    stored = sorted(
        p.rsplit("/", 2)[-2] for p in fs.glob(f"{work}/checkpoints/*/.domaintune-complete")
    )
    assert stored[-1] == "checkpoint-4", stored
    assert len(json.loads(fs.cat_file(f"{work}/attempts.json"))) == 1

    _host(monkeypatch, tmp_path, "b")
    store_b = Store.of(cfg)
    splits_b = preprocess(cfg, ingest(cfg, store_b), store_b)
    assert splits_b.reused
    model = finetune_stage.finetune(cfg, splits_b, store_b)
    first, second = model.attempts
    assert first["exit_code"] != 0 and second["resumed_from"] == "checkpoint-4"
    summary = json.loads((Path(model.model_dir) / "training_summary.json").read_text())
    assert summary["start_step"] == 4 and summary["global_step"] == 10
    assert summary["best_checkpoint"].startswith(str(tmp_path / "host-b")), (
        "the best checkpoint is this host's copy, not the path on the host that wrote it"
    )

    clean = make_config(src, training=training)  # a local store, never interrupted
    clean_store = Store(clean.store.root)
    clean_model = finetune_stage.finetune(
        clean, preprocess(clean, ingest(clean, clean_store), clean_store), clean_store
    )
    worst = max_weight_difference(model.model_dir, clean_model.model_dir)
    assert worst < 1e-5, f"resumed on another host differs from an uninterrupted run by {worst}"


def test_wrong_credentials_and_an_unreachable_store_give_one_clear_line(
    tmp_path, monkeypatch, make_config, s3
):
    from tests.services import free_port, s3_server_checking_credentials

    # an S3 API server that checks credentials; the right key id, a wrong secret
    with s3_server_checking_credentials(tmp_path / "auth") as checking:
        wrong = "not-the-secret-a1b2c3d4e5"
        monkeypatch.setenv("DT_KEY_ID", checking.key)
        monkeypatch.setenv("DT_WRONG_SECRET", wrong)
        cfg = make_config(
            tmp_path / "d.csv",
            store={
                "root": "s3://bucket-x/store",
                "storage_options": {
                    "endpoint_url": checking.endpoint,
                    "key": "${env:DT_KEY_ID}",
                    "secret": "${env:DT_WRONG_SECRET}",
                },
            },
        )
        with pytest.raises(StoreAccessError) as denied:
            Store.of(cfg)
    msg = str(denied.value)
    assert "\n" not in msg and "access denied" in msg, msg
    assert wrong not in msg and checking.secret not in msg and checking.key not in msg, msg
    assert "s3://bucket-x/store" in msg

    port = free_port()  # nothing listens there
    cfg = make_config(
        tmp_path / "d.csv",
        store={
            "root": "s3://bucket-y/store",
            "storage_options": {
                "endpoint_url": f"http://127.0.0.1:{port}",
                "key": "${env:DT_S3_KEY}",
                "secret": "${env:DT_S3_SECRET}",
            },
        },
    )
    with pytest.raises(StoreError) as unreachable:
        Store.of(cfg)
    msg = str(unreachable.value)
    assert "\n" not in msg and "cannot reach" in msg and os.environ["DT_S3_SECRET"] not in msg, msg


@pytest.mark.slow
def test_a_run_on_a_store_it_cannot_use_fails_in_one_line_and_registers_nothing(
    tmp_path, make_config, rows, monkeypatch
):
    """`domaintune run` against an S3 store that refuses its credentials (exit 2: fixing
    them is the user's job, so no retry) and against one that does not answer (exit 1): the
    run fails with one line naming the store and what failed, no secret, nothing promoted."""
    from tests.services import free_port, s3_server_checking_credentials
    from tests.test_cli import cli, write_config

    src = write_csv(tmp_path / "d.csv", rows(30))
    wrong = "wrong-secret-0a1b2c3d4e5f"

    def failed_run(name: str, options: dict) -> tuple[int, dict, str]:
        cfg = make_config(
            src,
            store={"root": "s3://models/store", "storage_options": options},
            retries={"count": 0, "delay_seconds": 0},
        )
        run = cli("run", write_config(tmp_path / f"{name}.yaml", cfg), "--json")
        doc = json.loads(run.stdout)
        assert doc["status"] == "failed" and doc["promoted"] is False
        assert "\n" not in doc["error"] and wrong not in run.stdout + run.stderr
        assert [s["name"] for s in doc["stages"]] == ["ingest"], "nothing past the first stage"
        return run.returncode, doc, run.stderr

    with s3_server_checking_credentials(tmp_path / "auth") as checking:
        monkeypatch.setenv("DT_KEY_ID", checking.key)
        monkeypatch.setenv("DT_WRONG_SECRET", wrong)
        options = {
            "endpoint_url": checking.endpoint,
            "key": "${env:DT_KEY_ID}",
            "secret": "${env:DT_WRONG_SECRET}",
        }
        code, doc, err = failed_run("denied", options)
    assert code == 2, err[-2000:]
    assert doc["error"].startswith("store s3://models/store: access denied"), doc["error"]

    options["endpoint_url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, doc, err = failed_run("away", options)
    assert code == 1, err[-2000:]
    assert doc["error"].startswith("store s3://models/store: cannot reach the object store")
