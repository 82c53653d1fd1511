"""The ``tune`` flow and ``domaintune tune`` for real: Optuna trials as Prefect tasks on a real
(temporary) Prefect server, each a real DeepSpeed-launched fine-tuning of the tiny model,
pruning from the per-epoch validation metric, and a study in the store that survives a
SIGKILL of the whole process tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from domaintune.errors import ConfigError
from domaintune.runconfig import load_config
from domaintune.training.checkpoints import CHECKPOINT_MARKER
from tests.conftest import write_csv

pytestmark = [pytest.mark.slow]

GOOD_LR, BAD_LR = 5e-3, 1e-9


def _task_runs(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name: r.state.name for r in runs}


def _artifacts(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def _complete_entries(store: Path, stage: str) -> list[Path]:
    return sorted(p.parent for p in (store / stage).glob("*/_COMPLETE.json"))


@pytest.mark.usefixtures("prefect_server")
def test_a_study_prunes_a_hopeless_trial_tests_the_best_once_and_registers_it(
    tmp_path, make_config, rows
):
    from domaintune.flows.retrain import retrain
    from domaintune.flows.tune import tune
    from domaintune.tuning import with_values

    src = write_csv(tmp_path / "d.csv", rows(40))
    # random sampling with this seed draws: the good learning rate; a strategy the 2-layer
    # model refuses (the search goes on); the hopeless learning rate; the good one with the
    # other evaluation batch size, a key that changes nothing in the training's course, so
    # that trial matches the first evaluation for evaluation and the pruner keeps it, while
    # the hopeless one falls behind the first
    cfg = make_config(
        src,
        training={"epochs": 4},
        tune={
            "trials": 4,
            "sampler": "random",
            "seed": 290,
            "prune_startup_trials": 1,
            "space": {
                "training.learning_rate": {"choices": [GOOD_LR, BAD_LR]},
                "training.eval_batch_size": {"choices": [32, 64]},
                "training.strategy": {"choices": ["full", {"last_n_layers": 5}]},
            },
        },
    )
    summary = tune(cfg)

    trials = summary["trials"]
    assert [(t["learning_rate"], t["state"]) for t in trials] == [
        (GOOD_LR, "complete"),
        (GOOD_LR, "refused"),
        (BAD_LR, "pruned"),
        (GOOD_LR, "complete"),
    ], trials
    assert "last_n_layers" in trials[1]["note"] and trials[2]["note"].startswith("pruned at")
    assert trials[0]["eval_batch_size"] != trials[3]["eval_batch_size"]
    assert trials[0]["value"] == trials[3]["value"]
    best = summary["best"]
    assert best["value"] == max(t["value"] for t in trials if t["value"] is not None)
    assert best["params"]["training.learning_rate"] == GOOD_LR
    assert summary["study"]["counts"] == {"complete": 2, "refused": 1, "pruned": 1}
    assert summary["study"]["importances"], "two completed trials with different settings"
    assert summary["version"] == "v0001" and summary["promoted"]
    assert summary["metrics"]["finetuned"]["accuracy"] > summary["metrics"]["base"]["accuracy"]
    stages = {s["name"]: s["cached"] for s in summary["stages"]}
    assert stages == {
        "ingest": False,
        "validate": False,
        "preprocess": False,
        "monitor": False,
        "finetune": True,  # the best trial's entry
        "evaluate": False,
        "register": False,
    }

    store = Path(cfg.store.root)
    # the test split was scored once: one evaluation entry, of the registered model
    assert len(_complete_entries(store, "evaluate")) == 1
    # the pruned trial left no entry and no checkpoints behind
    assert len(_complete_entries(store, "finetune")) == 2
    assert not list((store / "finetune" / ".work").glob("*/checkpoints"))

    states = _task_runs(summary["run_id"])
    assert {k: v for k, v in states.items() if k.startswith("trial-")} == {
        "trial-0": "Completed",
        "trial-1": "Failed",  # refused: not retried, the search went on
        "trial-2": "Pruned",
        "trial-3": "Completed",
    }
    assert states["finetune"] == "Cached" and states["evaluate"] == "Completed"
    artifacts = _artifacts(summary["run_id"])
    (table,) = [a for a in artifacts if a.type == "table" and "search" in a.description]
    table_rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["state"] for r in table_rows] == ["complete", "refused", "pruned", "complete"]
    assert {"number", "value", "learning_rate", "eval_batch_size", "seconds", "cached"} <= set(
        table_rows[0]
    )
    (report,) = [
        a.data for a in artifacts if a.type == "markdown" and "importances" in a.description
    ]
    assert "## Parameter importance" in report and "| training.learning_rate |" in report
    assert report.count("](data:image/svg+xml;base64,") == 2, "importance and per-trial charts"

    # the tune section is in no cache key: the best settings through `domaintune run`, with
    # another tune section, are the same entries and the same version
    other = with_values(
        cfg, {**best["params"], "tune.trials": 50, "tune.sampler": "tpe", "tune.seed": None}
    )
    again = retrain(other)
    assert all(s["cached"] for s in again["stages"]), again["stages"]
    assert again["version"] == "v0001"

    # the same search again: the study is finished, nothing trains, nothing is tested again
    rerun = tune(cfg)
    assert [t["state"] for t in rerun["trials"]] == [t["state"] for t in trials]
    assert all(s["cached"] for s in rerun["stages"]), rerun["stages"]
    assert not [k for k in _task_runs(rerun["run_id"]) if k.startswith("trial-")]


def _cli(*args: str, api: str | None = None, **kwargs) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the CLI starts Prefect's local server, as for a user
    if api:  # ... or uses the one PREFECT_API_URL names
        env["PREFECT_API_URL"] = api
    return subprocess.Popen(
        [sys.executable, "-m", "domaintune.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        **kwargs,
    )


def _kill_tree_while_the_second_trial_trains(proc: subprocess.Popen, store: Path, seen: dict):
    """SIGKILL the CLI and every process under it (Prefect's server, the DeepSpeed launcher
    and its worker) once trial 0 is a complete entry and trial 1 has a checkpoint."""
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = _complete_entries(store, "finetune")
        marks = [
            m
            for m in (store / "finetune" / ".work").glob(f"*/checkpoints/*/{CHECKPOINT_MARKER}")
            if m.parents[2].name not in {d.name for d in done}
        ]
        if len(done) == 1 and marks:
            seen["done"] = [d.name for d in done]
            seen["training"] = marks[0].parents[2].name
            tree = psutil.Process(proc.pid).children(recursive=True)
            for p in [psutil.Process(proc.pid), *tree]:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
            seen["killed"] = len(tree) + 1
            return
        time.sleep(0.05)


@pytest.mark.usefixtures("prefect_server")
def test_domaintune_tune_resumes_the_study_after_the_process_tree_is_killed(
    tmp_path, make_config, rows
):
    from prefect.settings import PREFECT_API_URL

    from domaintune.cli import render_tune_summary

    src = write_csv(tmp_path / "d.csv", rows(30))
    cfg = make_config(
        src,
        training={"epochs": 2},
        tune={
            "trials": 2,
            "sampler": "random",
            "pruner": "none",
            "space": {"training.learning_rate": {"low": 1e-3, "high": 8e-3, "log": True}},
        },
    )
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    store = Path(cfg.store.root)

    api = PREFECT_API_URL.value()  # the test's Prefect server, which outlives the kill
    first = _cli("tune", str(path), api=api)
    seen: dict = {}
    watcher = threading.Thread(
        target=_kill_tree_while_the_second_trial_trains, args=(first, store, seen)
    )
    watcher.start()
    watcher.join()
    first.wait(timeout=60)
    assert "killed" in seen, f"never killed: {first.stderr.read()[-3000:]}"
    assert first.returncode == -signal.SIGKILL

    second = _cli("tune", str(path), "--json", api=api)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    doc = json.loads(out)
    trials = doc["trials"]
    assert [(t["state"], t["retry_of"]) for t in trials] == [
        ("complete", None),
        ("failed", None),  # killed while it trained
        ("complete", 1),  # its settings again
    ], trials
    assert trials[2]["learning_rate"] == trials[1]["learning_rate"]
    assert trials[1]["note"] == "killed while it trained; tried again as trial 2"
    assert any("trial 1 was left running" in line for line in doc["study"]["recovered"])
    assert doc["study"]["counts"] == {"complete": 2, "failed": 1}
    # trial 0 was not trained again; trial 1's training resumed from its checkpoint
    (entry0,) = seen["done"]
    assert len(json.loads((store / "finetune" / entry0 / "attempts.json").read_text())) == 1
    resumed = json.loads((store / "finetune" / seen["training"] / "attempts.json").read_text())
    assert len(resumed) == 2 and resumed[0].get("lost") and resumed[1]["resumed_from"]
    assert doc["version"] == "v0001" and doc["best"]["trial"] in (0, 2)
    assert {k: v for k, v in _task_runs(doc["run_id"]).items() if k.startswith("trial-")} == {
        "trial-2": "Completed"
    }, "the second run trains only the killed trial's settings again"

    text = render_tune_summary(doc)  # what `domaintune tune` prints without --json
    assert text.startswith("tune 'test-uc' (domain finance): COMPLETED")
    assert "best:     trial" in text and "--set training.learning_rate=" in text
    assert "trial 1: killed while it trained" in text and f"({doc['version']})" in text


def test_bad_search_spaces_fail_at_load_in_one_line(tmp_path, make_config, rows):
    base = {"name": "uc", "data": {"source": "d.csv"}}
    cases = {
        "training.learning_rte": ({"low": 1e-5, "high": 1e-3}, "not a config key; did you mean"),
        "training.learning_rate": ({"low": 1e-5, "high": 2.0}, "2.0 is refused"),
        "training.strategy.kind": ({"choices": ["full", "frozen"]}, "'frozen' is refused"),
        "training.max_length": ({"choices": [64, 128]}, "decides how the texts are tokenized"),
        "data.text_column": ({"choices": ["a", "b"]}, "tune searches training settings"),
        "training.batch_size": ({"low": 8.5, "high": 32}, "is an integer"),
    }
    for key, (spec, rule) in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(data={**base, "tune": {"space": {key: spec}}})
        (problem,) = str(info.value).splitlines()[1:]
        assert f"tune.space.{key}: " in problem and rule in problem, problem
    with pytest.raises(ConfigError, match=r"tune.space.training.warmup_ratio: .*log range"):
        load_config(
            data={
                **base,
                "tune": {"space": {"training.warmup_ratio": {"low": 0, "high": 1, "log": True}}},
            }
        )

    from domaintune.config import TuneParamConfig
    from domaintune.tuning import check_space

    recipe = load_config(
        data={
            **base,
            "stages": [{"name": "dapt", "task": {"type": "masked_lm"}}, {"name": "classify"}],
        }
    )
    check_space(recipe)  # a recipe's search is of its last stage's settings
    bad = recipe.model_copy(
        update={
            "tune": recipe.tune.model_copy(
                update={
                    "space": {
                        "training.strategy.kind": TuneParamConfig(choices=["full", "last_n_layers"])
                    }
                }
            )
        }  # fmt: skip
    )
    with pytest.raises(ConfigError, match="tune.space.training.strategy.kind: 'last_n_layers'"):
        check_space(bad)

    # a value the key takes but this config refuses: before anything runs, exit code 2
    src = write_csv(tmp_path / "d.csv", rows(12))
    cfg = make_config(
        src, tune={"space": {"training.strategy.kind": {"choices": ["full", "last_n_layers"]}}}
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = _cli("tune", str(path))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "tune.space.training.strategy.kind: 'last_n_layers' is refused by this config" in line
    assert "needs last_n_layers" in line


def test_the_study_journal_is_numbered_objects_that_any_store_file_system_holds():
    import fsspec
    import optuna

    from domaintune.tuning import study_journal

    fs = fsspec.filesystem("memory")  # an object store's semantics: create-if-absent objects
    folder = f"/tune-journal-{os.getpid()}-{time.time_ns()}"
    storage = optuna.storages.JournalStorage
    first = optuna.create_study(
        storage=storage(study_journal(fs, folder)), study_name="s", direction="maximize"
    )
    trial = first.ask()
    trial.suggest_float("training.learning_rate", 1e-5, 1e-3, log=True)
    trial.report(0.5, 1)
    first.tell(trial, 0.75)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    assert names == sorted(names) and all(n[:-5].isdigit() and n.endswith(".json") for n in names)
    assert len(names) >= 4, "one object per append"

    # another process (another host) reads the same study and appends after it
    second = optuna.load_study(study_name="s", storage=storage(study_journal(fs, folder)))
    (seen,) = second.trials
    assert (seen.state.name, seen.value, seen.intermediate_values) == ("COMPLETE", 0.75, {1: 0.5})
    second.tell(second.ask(), 0.25)
    assert [t.value for t in first.trials] == [0.75, 0.25]
