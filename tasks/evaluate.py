"""evaluate: the fine-tuned model and the base model on the same untouched test split.

The base model is loaded with the same seed right before loading, so its (untrained) task
head is exactly the one fine-tuning started from: the gain shown is the gain from training.
Base-model results are cached separately (they depend only on the base model, the test
split and the seed), so trying new hyperparameters does not re-run them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from domaintune.chaining import resolve_config_model, resolve_model
from domaintune.config import RetrainConfig
from domaintune.fingerprint import hash_obj
from domaintune.redaction import redact, redact_obj
from domaintune.reporting.reports import render_markdown
from domaintune.scoring import not_comparable, score_model, scored_as
from domaintune.storage.manifests import (
    EvaluationReport,
    ModelArtifact,
    SplitManifest,
    scalar_metrics,
)
from domaintune.storage.store import Store
from domaintune.tasktypes import get_task_type
from domaintune.training.launch import inference_precision

log = logging.getLogger(__name__)

STAGE = "evaluate"
BASE_STAGE = "evaluate_base"
CHAMPION_STAGE = "evaluate_champion"
VERSION = "4"  # 2: base predictions kept; sample generations; 3: champion, charts; 4: the
# champion's per-example predictions kept (the paired test of promotion reads them)


def current_champion(config: RetrainConfig, store: Store) -> dict[str, Any] | None:
    """The production version of this use case (as the registry's log in the store says,
    whichever host promoted it): version, local model folder, model fingerprint."""
    from domaintune.registry import Registry

    return Registry(store, config.name).champion()


def base_structure(config: RetrainConfig) -> dict[str, Any] | None:
    """What the training strategy changes in the base model's architecture before training
    (None: nothing), which the base model's scoring applies too."""
    s = config.training.strategy
    out = s.model_dump(mode="json", include={"drop_top_layers", "head", "init_embeddings_from"})
    if s.init_embeddings_from:
        out["init_embeddings_from"] = resolve_model(s.init_embeddings_from).fingerprint()
    return out if any(out.values()) else None


def plan(
    config: RetrainConfig,
    splits: SplitManifest,
    model: ModelArtifact,
    champion: dict[str, Any] | None = None,
) -> tuple[str, str]:
    test = splits.splits["test"]
    structure = base_structure(config)
    base_key = hash_obj(
        BASE_STAGE,
        VERSION,
        test.fingerprint,
        model.base_fingerprint,
        splits.labels,
        scored_as(config, splits),
        config.training.seed,
        # scores in bf16 and in fp32 differ a little: each is its own measurement
        inference_precision(config.training)[0],
        # no term without structure changes: those keys stay as they were
        *([{"structure": structure}] if structure else []),
    )
    key = hash_obj(
        STAGE,
        VERSION,
        test.fingerprint,
        model.fingerprint,
        base_key,
        config.evaluation.primary_metric,
        champion["fingerprint"] if champion else None,
    )
    return key, base_key


def _base_metrics(
    config: RetrainConfig, splits: SplitManifest, base_key: str, store: Store
) -> dict[str, Any]:
    with store.lock(BASE_STAGE, base_key):
        cached = store.cached_manifest(BASE_STAGE, base_key)
        if cached is not None:
            return cached["metrics"]
        base = resolve_config_model(config)
        # the base model exactly as training starts from it
        strategy = config.training.strategy if base_structure(config) else None
        metrics, predictions = score_model(config, base.path, splits, strategy, who="base model")
        with store.writer(BASE_STAGE, base_key) as w:
            (w.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
            predictions.to_parquet(w.path / "predictions.parquet", index=False)
            w.manifest = {"metrics": metrics, "model": base.name}
        return metrics


def evaluate(
    config: RetrainConfig, splits: SplitManifest, model: ModelArtifact, store: Store
) -> EvaluationReport:
    champion = current_champion(config, store)
    if champion is not None and champion["fingerprint"] == model.fingerprint:
        champion = None  # this very model is the champion: the same run again, all cached
    key, base_key = plan(config, splits, model, champion)
    return store.compute_once(
        STAGE,
        key,
        EvaluationReport,
        lambda: _run(config, splits, model, store, key, base_key, champion),
    )


def _champion_metrics(
    config: RetrainConfig, splits: SplitManifest, champion: dict[str, Any] | None, store: Store
) -> dict[str, Any] | None:
    """The champion re-scored on this run's test split (the same frozen set as the new
    model), or why it cannot be: then promotion compares with its recorded metrics."""
    if champion is None:
        return None
    out: dict[str, Any] = {"version": champion["version"], "metrics": None}
    model_dir = Path(champion["model_dir"])
    why_not = not_comparable(champion, splits)
    if why_not:
        out["note"] = f"{why_not}; compared on its recorded metrics"
        return out
    key = hash_obj(
        CHAMPION_STAGE,
        VERSION,
        splits.splits["test"].fingerprint,
        champion["fingerprint"],
        splits.labels,
        scored_as(config, splits),
        inference_precision(config.training)[0],
    )
    with store.lock(CHAMPION_STAGE, key):
        cached = store.cached_manifest(CHAMPION_STAGE, key)
        if cached is None:
            metrics, predictions = score_model(
                config, str(model_dir), splits, who=f"champion {champion['version']}"
            )
            with store.writer(CHAMPION_STAGE, key) as w:
                (w.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
                # per example: promotion's paired test compares them with the challenger's
                predictions.to_parquet(w.path / "predictions.parquet", index=False)
                w.manifest = {"metrics": metrics, "version": champion["version"]}
            cached = {"metrics": metrics}
    out["metrics"] = cached["metrics"]
    out["key"] = key  # the entry (CHAMPION_STAGE) holding its predictions.parquet
    return out


def _run(
    config: RetrainConfig,
    splits: SplitManifest,
    model: ModelArtifact,
    store: Store,
    key: str,
    base_key: str,
    champion_info: dict[str, Any] | None = None,
) -> EvaluationReport:
    base = _base_metrics(config, splits, base_key, store)
    champion = _champion_metrics(config, splits, champion_info, store)
    finetuned, predictions = score_model(config, model.model_dir, splits)
    gain = {k: float(v - base[k]) for k, v in scalar_metrics(finetuned).items()}
    primary = config.evaluation.primary_metric
    test_rows = splits.splits["test"].rows
    with store.writer(STAGE, key) as w:
        entry = store.entry_path(STAGE, key)
        doc = {
            "primary_metric": primary,
            "test_rows": test_rows,
            "finetuned": finetuned,
            "base": base,
            "gain": gain,
            "model": model.model_dir,
            "base_model": model.base_model,
            "champion": champion,
            # every model above was scored in this precision (the training's, on this machine)
            "precision": dict(
                zip(("precision", "reason"), inference_precision(config.training), strict=True)
            ),
        }
        doc = redact_obj(doc)
        (w.path / "metrics.json").write_text(json.dumps(doc, indent=2))
        samples = _samples(config, store, base_key, predictions)
        if samples is not None:
            samples.to_parquet(w.path / "samples.parquet", index=False)
        charts = _charts(model, finetuned, primary)
        for name, svg in charts.items():
            (w.path / f"{name}.svg").write_text(svg)
        (w.path / "report.md").write_text(redact(render_markdown(doc, samples, charts)))
        predictions.to_parquet(w.path / "predictions.parquet", index=False)
        manifest = EvaluationReport(
            key=key,
            path=str(entry),
            fingerprint=hash_obj(doc),
            primary_metric=primary,
            finetuned=finetuned,
            base=base,
            gain=gain,
            test_rows=test_rows,
            champion=champion,
            metrics_json=str(entry / "metrics.json"),
            report_markdown=str(entry / "report.md"),
        )
        w.manifest = manifest.model_dump(mode="json")
    log.info(
        "evaluate: %s fine-tuned %.4f vs base %.4f (%+.4f) on %d test rows",
        primary,
        finetuned[primary],
        base[primary],
        gain[primary],
        test_rows,
    )
    return manifest


def _charts(model: ModelArtifact, finetuned: dict[str, Any], primary: str) -> dict[str, str]:
    """SVG charts for the report: the training curves (training / validation loss, validation
    ``primary`` metric, learning rate) and the confusion matrix."""
    from domaintune.reporting.charts import confusion_matrix_svg, training_curves_svg

    charts = {}
    history = Path(model.model_dir) / "log_history.json"
    if history.is_file():
        charts["loss_curve"] = training_curves_svg(json.loads(history.read_text()), primary)
    cm = finetuned.get("confusion_matrix")
    if cm and cm.get("labels"):
        charts["confusion_matrix"] = confusion_matrix_svg(cm["labels"], cm["matrix"])
    return charts


def _samples(
    config: RetrainConfig, store: Store, base_key: str, finetuned: pd.DataFrame
) -> pd.DataFrame | None:
    """Generation tasks: prompt, reference, base output and fine-tuned output side by side."""
    task = get_task_type(config.task.type)
    base_file = store.entry_path(BASE_STAGE, base_key) / "predictions.parquet"
    if not task.generative or not base_file.is_file():
        return None
    base = pd.read_parquet(base_file)
    return pd.DataFrame(
        {
            "prompt": finetuned["prompt"],
            "reference": finetuned["reference"],
            "base": base["predicted"],
            "fine-tuned": finetuned["predicted"],
        }
    )
