"""register: a versioned model folder with its metrics, config and lineage; promotion gate.

``<store>/registry/<name>/vNNNN/`` holds ``model/`` (weights and tokenizer, hard-linked from
the store when possible), ``metrics.json``, ``config.yaml``, ``lineage.json`` and, written last
as its completion marker, ``registration.json``. ``latest`` names the newest version and
``production`` the champion. Registering the same model, metrics and config again returns the
existing version instead of a copy.

Promotion (``decide_promotion``): the fine-tuned model must beat the base model, clear an
absolute floor, beat the champion re-scored on the same test split by a margin, and regress
no class or entity type beyond a tolerance. A model that is not promoted is still registered,
as a rejected candidate with the reason. A failed run never reaches this stage.
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

import yaml

from domaintune import __version__
from domaintune.config import RetrainConfig
from domaintune.errors import DomainTuneError
from domaintune.fingerprint import hash_obj
from domaintune.manifests import (
    EvaluationReport,
    ModelArtifact,
    RawSnapshot,
    Registration,
    SplitManifest,
)
from domaintune.redaction import redact_obj
from domaintune.store import Store, atomic_write_text, store_error

log = logging.getLogger(__name__)

STAGE = "register"
VERSION = "1"
MARKER = "registration.json"


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


def registry_dir(store: Store, name: str) -> Path:
    return store.entry_path("registry", name)


def read_pointer(reg: Path, pointer: str) -> str | None:
    p = reg / pointer
    return p.read_text().strip() or None if p.is_file() else None


def versions(reg: Path) -> list[dict[str, Any]]:
    """Complete versions, oldest first (a version without its marker is not one)."""
    out = []
    for d in sorted(reg.glob("v[0-9][0-9][0-9][0-9]")):
        if (d / MARKER).is_file():
            out.append(json.loads((d / MARKER).read_text()))
    return out


def plan(config: RetrainConfig, model: ModelArtifact, evaluation: EvaluationReport) -> str:
    """The same model with the same evaluation is one version, whatever else (logging, say)
    differed in the config; the promotion settings are part of it since they decide."""
    return hash_obj(
        STAGE,
        VERSION,
        config.name,
        model.fingerprint,
        evaluation.fingerprint,
        config.promotion.model_dump(mode="json"),
    )


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            _link_tree(item, dst / item.name)
        elif item.name not in ("_COMPLETE.json", "train.log"):
            try:
                os.link(item, dst / item.name)
            except OSError:
                shutil.copy2(item, dst / item.name)


def _export_model(config: RetrainConfig, model: ModelArtifact, dst: Path) -> None:
    """The registered model: a plain Hugging Face model folder, or for LoRA with
    ``merge_on_export: false`` the adapter alone, its tokenizer and its base model's name."""
    src = Path(model.model_dir)
    lora = config.training.strategy.lora
    if lora is None or lora.merge_on_export or not (src / "adapter").is_dir():
        _link_tree(src, dst)
        return
    _link_tree(src / "adapter", dst)
    weights = ("model.safetensors", "model.safetensors.index.json", "config.json")
    for item in src.iterdir():
        if item.is_file() and item.name not in weights and not item.name.startswith("model-"):
            if not (dst / item.name).exists() and item.name not in ("_COMPLETE.json", "train.log"):
                shutil.copy2(item, dst / item.name)
    (dst / "base_model.json").write_text(
        json.dumps(
            {
                "name": model.base_model,
                "fingerprint": model.base_fingerprint,
                "strategy": config.training.strategy.model_dump(mode="json"),
                "load": "peft.PeftModel.from_pretrained(<base prepared as in strategy>, this folder)",
            },
            indent=2,
        )
    )


def decide_promotion(
    config: RetrainConfig, evaluation: EvaluationReport, champion: dict[str, Any] | None
) -> tuple[bool, str]:
    """(promote?, why). In order: beat the base model by ``min_gain_over_base``; clear the
    absolute ``min_primary_metric`` (a ceiling for perplexity); beat the champion, re-scored
    on this run's test split, by ``margin_over_champion``; and no class or entity type F1
    below the champion's by more than ``max_class_regression``."""
    from domaintune.config import LOWER_IS_BETTER

    rules = config.promotion
    m = evaluation.primary_metric
    sign = -1.0 if m in LOWER_IS_BETTER else 1.0  # compare as "higher is better"
    new = evaluation.finetuned[m]
    base = evaluation.base[m]
    need = rules.min_gain_over_base
    if sign * (new - base) < need or sign * (new - base) <= 0:
        return False, f"{m} {new:.4f} does not beat the base model's {base:.4f} by {need}"
    floor = rules.min_primary_metric
    if floor is not None and sign * (new - floor) < 0:
        bound = "above the ceiling" if sign < 0 else "below the floor"
        return False, f"{m} {new:.4f} is {bound} of {floor} (promotion.min_primary_metric)"
    if champion is None:
        return True, f"first champion: {m} {new:.4f} (base {base:.4f})"
    scored = evaluation.champion or {}
    champ_metrics = scored.get("metrics")
    if champ_metrics:
        champ, where = champ_metrics[m], "on this test split"
    else:
        champ = champion.get("metrics", {}).get(m)
        where = f"as recorded ({scored.get('note', 'not re-scored')})"
    name = champion["version"]
    margin = rules.margin_over_champion
    if champ is not None and (sign * (new - champ) <= 0 or sign * (new - champ) < margin):
        return (
            False,
            f"{m} {new:.4f} does not beat champion {name} ({champ:.4f} {where}) by {margin}",
        )
    for table, unit in (("per_class", "class"), ("per_type", "entity type")):
        ours = evaluation.finetuned.get(table) or {}
        theirs = (champ_metrics or {}).get(table) or {}
        drops = [
            (theirs[lab]["f1"] - ours.get(lab, {}).get("f1", 0.0), lab)
            for lab in theirs
            if theirs[lab].get("support", 1)
        ]
        if drops and max(drops)[0] > rules.max_class_regression:
            drop, lab = max(drops)
            return False, (
                f"{unit} {lab!r} F1 falls from {theirs[lab]['f1']:.4f} (champion {name}) to "
                f"{ours.get(lab, {}).get('f1', 0.0):.4f}, more than "
                f"promotion.max_class_regression {rules.max_class_regression}"
            )
    return True, f"{m} {new:.4f} beats champion {name} ({champ:.4f} {where})"


def register(
    config: RetrainConfig,
    raw: RawSnapshot,
    splits: SplitManifest,
    model: ModelArtifact,
    evaluation: EvaluationReport,
    store: Store,
    flow_run_id: str | None = None,
) -> Registration:
    key = plan(config, model, evaluation)
    reg = registry_dir(store, config.name)
    reg.mkdir(parents=True, exist_ok=True)
    with store.lock("registry", config.name):
        existing = versions(reg)
        for v in existing:
            if v.get("key") == key:
                log.info("register: %s %s already holds this model", config.name, v["version"])
                return Registration.model_validate({**v, "reused": True})
        number = max((int(v["version"][1:]) for v in existing), default=0) + 1
        version = f"v{number:04d}"
        champion_version = read_pointer(reg, "production")
        champion = next((v for v in existing if v["version"] == champion_version), None)
        promoted, reason = decide_promotion(config, evaluation, champion)
        final = reg / version
        tmp = reg / f".tmp-{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # an earlier attempt that never got its marker
        try:
            _export_model(config, model, tmp / "model")
            shutil.copy2(evaluation.metrics_json, tmp / "metrics.json")
            shutil.copy2(evaluation.report_markdown, tmp / "evaluation.md")
            (tmp / "config.yaml").write_text(
                yaml.safe_dump(redact_obj(config.model_dump(mode="json")), sort_keys=False)
            )
            lineage = {
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
                    **{
                        n: {"rows": s.rows, "fingerprint": s.fingerprint}
                        for n, s in splits.splits.items()
                    },
                },
                "tokenizer_fingerprint": splits.tokenizer_fingerprint,
                "base_model": {"name": model.base_model, "fingerprint": model.base_fingerprint},
                "model": {
                    "key": model.key,
                    "fingerprint": model.fingerprint,
                    "global_step": model.global_step,
                    "attempts": model.attempts,
                },
                "evaluation": {"key": evaluation.key, "fingerprint": evaluation.fingerprint},
            }
            (tmp / "lineage.json").write_text(json.dumps(redact_obj(lineage), indent=2))
            os.replace(tmp, final)
        except OSError as exc:  # a full disk, a read-only store: a clear error, no version
            shutil.rmtree(tmp, ignore_errors=True)
            raise store_error(exc, tmp) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        manifest = Registration(
            key=key,
            path=str(final),
            fingerprint=hash_obj(key, version),
            name=config.name,
            version=version,
            model_dir=str(final / "model"),
            promoted=promoted,
            promotion_reason=reason,
            registry_dir=str(reg),
            primary_metric=evaluation.primary_metric,
            metrics={k: v for k, v in evaluation.finetuned.items() if isinstance(v, int | float)},
        )
        try:
            atomic_write_text(
                final / MARKER, json.dumps(manifest.model_dump(mode="json"), indent=2)
            )
        except OSError as exc:
            shutil.rmtree(final, ignore_errors=True)  # never a version without its marker
            raise store_error(exc, final) from exc
        try:  # the version is complete; a failure here leaves the pointers as they were
            atomic_write_text(reg / "latest", version)
            if promoted:
                atomic_write_text(reg / "production", version)
        except OSError as exc:
            raise store_error(exc, reg) from exc
        _history(
            reg,
            action="register",
            version=version,
            promoted=promoted,
            reason=reason,
            flow_run_id=flow_run_id,
        )
    log.info(
        "register: %s %s (%s: %s)",
        config.name,
        version,
        "promoted" if promoted else "not promoted",
        reason,
    )
    return manifest


# ------------------------------------------------------------------ registry operations


def _history(reg: Path, **event: Any) -> None:
    event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}
    with open(reg / "history.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")


def history(reg: Path) -> list[dict[str, Any]]:
    p = reg / "history.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def production_stack(reg: Path) -> list[str]:
    """Champions in order: each promotion pushes, each rollback pops."""
    stack: list[str] = []
    for e in history(reg):
        action = e.get("action", "register")
        if action == "register" and e.get("promoted") or action == "promote":
            if not stack or stack[-1] != e["version"]:
                stack.append(e["version"])
        elif action == "rollback" and stack:
            stack.pop()
    return stack


def use_cases(store: Store) -> list[str]:
    root = store.entry_path("registry", "x").parent
    return sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []


def version_table(store: Store, name: str) -> list[dict[str, Any]]:
    """Every version of a use case with its status: champion, candidate or rejected."""
    reg = registry_dir(store, name)
    prod = read_pointer(reg, "production")
    rows = []
    for v in versions(reg):
        status = (
            "champion"
            if v["version"] == prod
            else ("rejected" if not v["promoted"] else "former champion")
        )
        rows.append(
            {
                "version": v["version"],
                "status": status,
                "primary_metric": v["primary_metric"],
                "value": v["metrics"].get(v["primary_metric"]),
                "reason": v["promotion_reason"],
                "created_at": _created_at(reg / v["version"]),
            }
        )
    return rows


def show_version(store: Store, name: str, version: str) -> dict[str, Any]:
    reg = registry_dir(store, name)
    d = reg / version
    if not (d / MARKER).is_file():
        known = ", ".join(v["version"] for v in versions(reg)) or "none"
        raise DomainTuneError(f"{name}: no registered version {version!r} (known: {known})")
    return {
        "registration": json.loads((d / MARKER).read_text()),
        "lineage": json.loads((d / "lineage.json").read_text()),
        "metrics": json.loads((d / "metrics.json").read_text()),
        "config": yaml.safe_load((d / "config.yaml").read_text()),
        "production": read_pointer(reg, "production") == version,
    }


def promote(store: Store, name: str, version: str, reason: str = "manual promotion") -> str:
    """Make ``version`` the champion by hand (the gate is not consulted: a person decided)."""
    reg = registry_dir(store, name)
    show_version(store, name, version)  # exists?
    with store.lock("registry", name):
        previous = read_pointer(reg, "production")
        atomic_write_text(reg / "production", version)
        _history(reg, action="promote", version=version, previous=previous, reason=reason)
    log.info("models: %s production %s -> %s (%s)", name, previous, version, reason)
    return version


def rollback(store: Store, name: str, reason: str = "manual rollback") -> str:
    """Give production back to the champion before the current one."""
    reg = registry_dir(store, name)
    with store.lock("registry", name):
        stack = production_stack(reg)
        if len(stack) < 2:
            raise DomainTuneError(
                f"{name}: nothing to roll back to (production history: {stack or 'empty'})"
            )
        current, previous = stack[-1], stack[-2]
        atomic_write_text(reg / "production", previous)
        _history(reg, action="rollback", version=previous, previous=current, reason=reason)
    log.info("models: %s rolled back %s -> %s", name, current, previous)
    return previous


def _created_at(version_dir: Path) -> str | None:
    try:
        return json.loads((version_dir / "lineage.json").read_text()).get("created_at")
    except (OSError, ValueError):
        return None
