"""register: a versioned model folder with its metrics, config and lineage; promotion gate.

``<store>/registry/<name>/vNNNN/`` holds ``model/`` (weights and tokenizer: hard-linked from
the store when local, copied inside the object store when remote; plus its model card
``README.md``, domaintune.reporting.modelcard), ``metrics.json``,
``config.yaml``, ``lineage.json`` and ``registration.json``; the version exists once the
registry's event log commits it (``domaintune.registry``), which also moves ``latest`` and,
when promoted, ``production``. Registering the same model, metrics and config again returns
the existing version instead of a copy.

Promotion (``domaintune.promotion.decide_promotion``): the fine-tuned model must beat the
base model, clear an absolute floor, beat the champion re-scored on the same test split by a
margin and significantly (a paired test on the same test rows), not forget what the champion
knew when trained from it, and regress no class or entity type beyond a tolerance. A model that is not promoted
is still registered, as a rejected candidate with the reason. A failed run never reaches this stage, and a
registration that fails half-way leaves no version and moves no pointer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from domaintune import __version__
from domaintune.config import RetrainConfig
from domaintune.errors import StoreError, store_error
from domaintune.fingerprint import hash_obj
from domaintune.promotion import PairedPredictions, decide_promotion, gather_evidence
from domaintune.redaction import redact_obj
from domaintune.registry import MARKER, Registry
from domaintune.reporting.modelcard import write_model_card
from domaintune.reporting.tracking import TENSORBOARD_DIR
from domaintune.storage.manifests import (
    EvaluationReport,
    ExportManifest,
    HealthReport,
    ModelArtifact,
    RawSnapshot,
    Registration,
    SplitManifest,
    scalar_metrics,
)
from domaintune.storage.store import Store
from domaintune.tasks.evaluate import CHAMPION_STAGE
from domaintune.tasks.evaluate import STAGE as EVALUATE_STAGE

log = logging.getLogger(__name__)

STAGE = "register"
VERSION = "1"


def code_version() -> dict[str, Any]:
    """The package version plus the git commit of the source tree, when there is one."""
    src = Path(__file__).resolve().parent.parent
    commit = dirty = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
        if commit:
            dirty = bool(
                subprocess.run(
                    ["git", "status", "--porcelain"],
                    cwd=src,
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
            )
    except (OSError, subprocess.SubprocessError):
        pass
    return {"domaintune": __version__, "git_commit": commit, "git_dirty": dirty}


def plan(config: RetrainConfig, model: ModelArtifact, evaluation: EvaluationReport) -> str:
    """The same model with the same evaluation is one version, whatever else (logging, say)
    differed in the config; the promotion settings are part of it since they decide."""
    return hash_obj(
        STAGE,
        VERSION,
        config.name,
        model.fingerprint,
        evaluation.fingerprint,
        _deciding(config),
    )


def _deciding(config: RetrainConfig) -> dict[str, Any]:
    """The settings that decide promotion, as keys had them before the paired test (its
    settings and the forgetting guard's appear only when not at their defaults, so a
    registered model is found again)."""
    rules = config.promotion.model_dump(mode="json")
    evidence = config.promotion.model_dump(
        mode="json", include={"significance", "test", "bootstrap_resamples"}, exclude_defaults=True
    )
    out = {
        k: v for k, v in rules.items() if k not in ("significance", "test", "bootstrap_resamples")
    }
    out.update(evidence)
    if config.retrain.start_from == "champion":
        out["forgetting_tolerance"] = config.retrain.forgetting_tolerance
    return out


_NOT_EXPORTED = ("_COMPLETE.json", "train.log")


def _export_plan(config: RetrainConfig, model: ModelArtifact) -> tuple[dict[str, Path], dict]:
    """The registered model's files: ``model/<rel>`` -> the file in the finetune entry, plus
    ``base_model.json`` for a LoRA adapter exported alone. A plain Hugging Face model folder,
    or for LoRA with ``merge_on_export: false`` the adapter, its tokenizer and its base
    model's name."""
    src = Path(model.model_dir)
    lora = config.training.strategy.lora
    files: dict[str, Path] = {}
    if lora is None or lora.merge_on_export or not (src / "adapter").is_dir():
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            # the entry's TensorBoard event files are the training's record, not the model
            if p.is_file() and p.name not in _NOT_EXPORTED and rel.parts[0] != TENSORBOARD_DIR:
                files[rel.as_posix()] = p
        return files, {}
    for p in sorted((src / "adapter").rglob("*")):
        if p.is_file() and p.name not in _NOT_EXPORTED:
            files[p.relative_to(src / "adapter").as_posix()] = p
    weights = ("model.safetensors", "model.safetensors.index.json", "config.json")
    for p in src.iterdir():
        if (
            p.is_file()
            and p.name not in weights
            and not p.name.startswith("model-")
            and p.name not in _NOT_EXPORTED
        ):
            files.setdefault(p.name, p)
    base = {
        "name": model.base_model,
        "fingerprint": model.base_fingerprint,
        "strategy": config.training.strategy.model_dump(mode="json"),
        "load": "peft.PeftModel.from_pretrained(<base prepared as in strategy>, this folder)",
    }
    return files, base


def _stage_model(
    config: RetrainConfig, model: ModelArtifact, store: Store, dst: Path
) -> dict[str, str]:
    """Put the model into the staged version folder (hard links, else copies) and return
    what the object store can copy on its own side (``model/<rel>`` -> source in the
    store's file system)."""
    files, base = _export_plan(config, model)
    entry = Path(model.model_dir)
    server_copies: dict[str, str] = {}
    for rel, p in files.items():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)
        if not store.local:
            server_copies[f"model/{rel}"] = store.remote_path(
                "finetune", model.key, p.relative_to(entry).as_posix()
            )
    if base:
        (dst / "base_model.json").write_text(json.dumps(base, indent=2))
    return server_copies


def register(
    config: RetrainConfig,
    raw: RawSnapshot,
    splits: SplitManifest,
    model: ModelArtifact,
    evaluation: EvaluationReport,
    store: Store,
    flow_run_id: str | None = None,
    recipe: RetrainConfig | None = None,
    chain: list[dict[str, Any]] | None = None,
    health: HealthReport | None = None,
    exports: list[ExportManifest] | None = None,
) -> Registration:
    """``config`` is the final stage's; for a multi-stage recipe ``recipe`` is the whole
    config (what ``config.yaml`` keeps, to run again) and ``chain`` the earlier stages (in
    the lineage); ``health``: the monitor stage's report of this run (the champion on the
    new files and their drift), for the lineage and the model card; ``exports``: the export
    stage's verified exports of this model (copied to ``exports/<format>/``) and refusals."""
    key = plan(config, model, evaluation)
    registry = Registry(store, config.name)
    with registry.lock():
        state = registry.state()
        for version, existing in state.versions.items():
            if existing.get("key") == key:
                log.info("register: %s %s already holds this model", config.name, version)
                return Registration.model_validate({**existing, "reused": True})
        champion_version = state.production
        champion = (
            {"version": champion_version, **state.versions[champion_version]}
            if champion_version in state.versions
            else None
        )
        evidence = gather_evidence(config, evaluation, _paired(evaluation, splits, registry, store))
        promoted, reason = decide_promotion(config, evaluation, champion, evidence)
        version = registry.next_version(state)
        manifest = Registration(
            key=key,
            path=registry.version_url(version),
            fingerprint=hash_obj(key, version),
            name=config.name,
            version=version,
            model_dir=registry.version_url(version, "model"),
            promoted=promoted,
            promotion_reason=reason,
            registry_dir=registry.url,
            primary_metric=evaluation.primary_metric,
            metrics=scalar_metrics(evaluation.finetuned),
            interval=_interval(config, evaluation, splits, store),
            evidence=evidence.model_dump(mode="json") if champion else None,
            exports=_exports_record(exports or []),
        )
        staged = None
        try:
            staged = registry.staging_dir(version)
            server_copies = _stage_model(config, model, store, staged / "model")
            server_copies.update(_stage_exports(exports or [], store, staged))
            shutil.copy2(evaluation.metrics_json, staged / "metrics.json")
            shutil.copy2(evaluation.report_markdown, staged / "evaluation.md")
            (staged / "config.yaml").write_text(
                yaml.safe_dump(
                    redact_obj((recipe or config).model_dump(mode="json")), sort_keys=False
                )
            )
            lineage = _lineage(flow_run_id, raw, splits, model, evaluation)
            if chain:  # a multi-stage recipe: the stages that led to this model, in order
                lineage["stages"] = chain
            if health is not None:  # why this run trained: the champion on the new files
                lineage["monitor"] = {
                    "key": health.key,
                    "champion": health.version,
                    "new_files": health.new_files,
                    "degraded": health.degraded,
                    "drifted": health.drifted,
                    "message": health.message,
                }
            (staged / "lineage.json").write_text(json.dumps(redact_obj(lineage), indent=2))
            # the model card: a new file (never the finetune entry's), uploaded, not server-copied
            write_model_card(
                staged / "model",
                config,
                raw,
                splits,
                model,
                evaluation,
                manifest,
                lineage,
                health,
            )
            server_copies.pop("model/README.md", None)
            (staged / MARKER).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2))
            registry.publish(version, staged, server_copies)
            staged = None
            registry.append(
                state,
                action="register",
                version=version,
                promoted=promoted,
                reason=reason,
                flow_run_id=flow_run_id,
                model_fingerprint=model.fingerprint,
                registration=manifest.model_dump(mode="json"),
            )
        except BaseException as exc:  # a full disk, a lost store: a clear error, no version
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            registry.discard(version)
            if isinstance(exc, OSError) and not isinstance(exc, StoreError):
                raise store_error(exc, registry.cache) from exc
            raise
    log.info(
        "register: %s %s (%s: %s)",
        config.name,
        version,
        "promoted" if promoted else "not promoted",
        reason,
    )
    return manifest


def _exports_record(exports: list[ExportManifest]) -> dict[str, Any]:
    """format -> where it is in the version, its parity and latency; or why it was refused."""
    out: dict[str, Any] = {}
    for e in exports:
        if e.refused:
            out[e.format] = {"refused": e.refused}
            continue
        out[e.format] = {
            "path": f"exports/{e.format}",
            "key": e.key,
            "bytes": e.bytes,
            "parity": e.parity,
            "latency": e.latency,
            "machine": e.machine,
        }
    return out


def _stage_exports(exports: list[ExportManifest], store: Store, staged: Path) -> dict[str, str]:
    """Each verified export's files into ``exports/<format>/`` of the staged version (hard
    links, else copies); returns the object store's server-side copies, as for the model."""
    from domaintune.tasks.export import STAGE as EXPORT_STAGE

    server_copies: dict[str, str] = {}
    for e in exports:
        if e.refused:
            continue
        entry = store.materialize(EXPORT_STAGE, e.key)
        for rel in e.files:
            target = staged / "exports" / e.format / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(entry / rel, target)
            except OSError:
                shutil.copy2(entry / rel, target)
            if not store.local:
                server_copies[f"exports/{e.format}/{rel}"] = store.remote_path(
                    EXPORT_STAGE, e.key, rel
                )
    return server_copies


def _interval(
    config: RetrainConfig, evaluation: EvaluationReport, splits: SplitManifest, store: Store
) -> dict[str, Any] | None:
    """The primary metric's bootstrap interval on the test split (None where the task type
    cannot resample it per example)."""
    from domaintune.evidence import bootstrap_interval
    from domaintune.tasktypes import get_task_type

    path = store.materialize(EVALUATE_STAGE, evaluation.key) / "predictions.parquet"
    if not path.is_file():
        return None
    task = get_task_type(config.task.type)
    stats = task.example_statistics(
        pd.read_parquet(path), evaluation.primary_metric, list(splits.labels)
    )
    if stats is None or stats.n == 0:
        return None
    return bootstrap_interval(
        stats,
        confidence=config.retrain.confidence,
        resamples=config.promotion.bootstrap_resamples,
        seed=config.evaluation.split_seed,
    ).model_dump(mode="json")


def _paired(
    evaluation: EvaluationReport, splits: SplitManifest, registry: Registry, store: Store
) -> PairedPredictions | None:
    """The champion's and this model's per-example predictions on this test split (the
    evaluate stage keeps both), for promotion's paired test; None where the champion was
    not re-scored here."""
    scored = evaluation.champion or {}
    if not scored.get("metrics") or not scored.get("key"):
        return None
    theirs = store.materialize(CHAMPION_STAGE, scored["key"]) / "predictions.parquet"
    ours = store.materialize(EVALUATE_STAGE, evaluation.key) / "predictions.parquet"
    if not (theirs.is_file() and ours.is_file()):
        return None
    champion = registry.champion() or {}
    return PairedPredictions(
        champion=pd.read_parquet(theirs),
        challenger=pd.read_parquet(ours),
        earlier_sources=frozenset(s["path"] for s in champion.get("sources", [])),
        labels=tuple(splits.labels),
    )


def _lineage(
    flow_run_id: str | None,
    raw: RawSnapshot,
    splits: SplitManifest,
    model: ModelArtifact,
    evaluation: EvaluationReport,
) -> dict[str, Any]:
    from domaintune.chaining import parent as registry_parent

    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prefect_flow_run_id": flow_run_id,
        "code_version": code_version(),
        "raw_snapshot": {
            "key": raw.key,
            "fingerprint": raw.fingerprint,
            "rows": raw.rows,
            "sources": [s.model_dump() for s in raw.sources],
        },
        "splits": {
            "key": splits.key,
            "fingerprint": splits.fingerprint,
            # rows data.on_invalid: quarantine left out (listed in validate's table)
            "quarantined": int(splits.stats.get("quarantined", 0)),
            **{n: {"rows": s.rows, "fingerprint": s.fingerprint} for n, s in splits.splits.items()},
        },
        "tokenizer_fingerprint": splits.tokenizer_fingerprint,
        "base_model": {
            "name": model.base_model,
            "fingerprint": model.base_fingerprint,
            # chained from a registered model: its reference and the version it resolved to
            **({"registry": parent} if (parent := registry_parent(model.base_model)) else {}),
        },
        "model": {
            "key": model.key,
            "fingerprint": model.fingerprint,
            "labels": model.labels,  # the head's labels in id order (an adapter alone lacks them)
            "global_step": model.global_step,
            "attempts": model.attempts,
        },
        "evaluation": {"key": evaluation.key, "fingerprint": evaluation.fingerprint},
        # retrain.start_from: champion: the new files' rows plus a replay share of earlier
        **({"training_data": continual} if (continual := _continual(splits)) else {}),
    }


def _continual(splits: SplitManifest) -> dict[str, Any] | None:
    stats = splits.stats
    if "train_rows_new" not in stats:
        return None
    return {
        "start_from": "champion",
        **{
            k: stats[k]
            for k in ("train_rows_new", "train_rows_replay", "train_rows_available_earlier")
            if k in stats
        },
    }
