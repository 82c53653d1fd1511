"""Scoring one model on one tokenized split: what evaluate (fine-tuned, base and champion on
the test split) and monitor (the champion on newly landed rows) both do.

The task type scores (``TaskType.score_split``); this module loads the model as evaluation
does (precision, autocast, generation casts) and reports a generative task type's progress
and tokens/s.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from domaintune.config import RetrainConfig
from domaintune.cpu_share import cpu_slot
from domaintune.generation import GenerationSettings, cast_for_generation
from domaintune.loading import autocast_for, load_for_scoring
from domaintune.storage.manifests import SplitManifest
from domaintune.tasktypes import get_task_type

log = logging.getLogger(__name__)


def scored_as(config: RetrainConfig, splits: SplitManifest) -> Any:
    """What decides how a model is scored besides the data and the model: the task type, the
    task settings its scoring reads (``TaskType.scoring_settings``: none for most) and, for a
    generative task type, how it generates (``GenerationSettings.of_run``)."""
    task = get_task_type(config.task.type)
    extra = task.scoring_settings(config.task)
    if task.generative:
        extra = {**(extra or {}), "generation": GenerationSettings.of_run(config, splits).key()}
    return config.task.type if extra is None else [config.task.type, extra]


def not_comparable(champion: dict[str, Any], splits: SplitManifest) -> str | None:
    """Why a registered model (``Registry.champion()``) cannot be scored on ``splits``'
    token ids, or None when it can."""
    model_dir = Path(champion["model_dir"])
    if not (model_dir / "config.json").is_file():
        return "it was exported as an adapter only"
    tokenizer = champion.get("tokenizer_fingerprint")
    if tokenizer and tokenizer != splits.tokenizer_fingerprint:
        from domaintune.fingerprint import hash_local_files
        from domaintune.models import TOKENIZER_FILES

        # the split is token ids of this run's tokenizer: the champion would read them as
        # other words (a MiniLM champion scored 0.29 on an MPNet run's ids); unless the
        # run tokenized with the champion's own saved tokenizer (continual training)
        if hash_local_files(model_dir, TOKENIZER_FILES) != splits.tokenizer_fingerprint:
            return "it was trained with another tokenizer"
    if splits.labels:
        cfg = json.loads((model_dir / "config.json").read_text())
        theirs = [cfg.get("id2label", {}).get(str(i)) for i in range(len(cfg.get("id2label", {})))]
        if theirs != list(splits.labels):
            return "its label set differs from this run's"
    return None


def score_model(
    config: RetrainConfig,
    model_path: str,
    splits: SplitManifest,
    structure: Any = None,
    who: str = "fine-tuned model",
    split_path: str | None = None,
    rows: int | None = None,
    stage: str = "evaluate",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """(metrics, per-example predictions) of one model on the test split, or on the
    tokenized rows at ``split_path`` (``rows`` of them), tokenized as ``splits`` were
    (``structure``: see ``domaintune.loading.load_for_scoring``; ``who``: the model's name
    in progress lines, after ``stage``). A generative task type reports its progress (a bar on a terminal,
    a log line every 10% or 30 s, a Prefect progress artifact) and its tokens/s."""
    from datasets import disable_progress_bars

    disable_progress_bars()
    task = get_task_type(config.task.type)
    # this host's cores are shared with other runs' CPU-heavy processes (domaintune.cpu_share)
    with cpu_slot(f"{stage}: {who}"):
        tok, model, precision = load_for_scoring(
            model_path,
            config.task.type,
            splits.labels,
            config.training,
            config.model.trust_remote_code,
            structure,
        )
        if split_path is None:
            split_path, rows = splits.splits["test"].path, splits.splits["test"].rows
        extra: dict[str, Any] = {}
        progress = None
        if task.generative:
            from domaintune.progress import Progress

            cast_for_generation(model, precision)  # the same answers, fewer casts per step
            progress = Progress(rows or 0, f"{stage}: {who} generates", unit="answers", logger=log)
            extra = {
                "generation": GenerationSettings.of_run(config, splits),
                "on_batch": progress.advance,
            }
        with autocast_for(model, precision):
            metrics, predictions = task.score_split(
                model,
                tok,
                split_path,
                splits.labels,
                config.evaluation.batch_size,
                settings=config.task,
                **extra,
            )
        if progress is not None:
            progress.close()
            metrics["generation"] = {
                **metrics.get("generation", {}),
                **extra["generation"].key(),
                "answers": progress.done,
                "tokens": progress.tokens,
                "seconds": round(progress.seconds, 1),
                "tokens_per_second": round(progress.tokens / max(progress.seconds, 1e-9), 1),
            }
        return metrics, predictions
