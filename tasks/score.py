"""score: new data scored with a registered model, one store entry per input file.

The ``score`` flow (``flows/score.py``) pins the model reference once (``NAME@production``
becomes the version it names at the start of the run, so every file of a run is scored by
the same model), then scores each input file in its own entry, keyed by the model's content
fingerprint and the file's: a file scored before by the same model is Cached, a new file
in a landing folder costs only itself, and a newly promoted version scores everything again.
Each entry holds ``predictions.parquet`` (the input's columns plus the task type's
predictions, as ``domaintune predict`` writes them) and a manifest that records which
version scored which file. Input files are only ever read.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, field_validator

from domaintune.config import RetriesConfig, Section, StoreConfig
from domaintune.fingerprint import hash_obj
from domaintune.redaction import redact
from domaintune.storage.manifests import ScoredFile
from domaintune.storage.store import Store

log = logging.getLogger(__name__)

STAGE = "score"
VERSION = "1"


class ScoreConfig(Section):
    """A scoring job: which model scores which files, and where the predictions go."""

    name: str = Field(
        ..., description="Name of the scoring job (flow run name, artifacts), e.g. finance-news."
    )
    model: str = Field(
        ...,
        description="NAME@production, NAME@latest or NAME@vNNNN in the store's registry, or a "
        "model folder. Pinned to one version at the start of each run.",
    )
    source: str | list[str] = Field(
        ...,
        description="Files to score: paths, globs or fsspec URLs (a landing folder: "
        "landing/<domain>/*.csv). CSV / JSONL / Parquet / text / CoNLL; no label column.",
    )
    text_column: str | None = Field(
        None, description="The input's text column (default: the model's data.text_column)."
    )
    batch_size: int | None = Field(
        None, gt=0, description="Rows per batch (default: the model's evaluation.batch_size)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options of the source's file system; credentials as ${env:NAME}.",
    )
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto",
        description="What runs the model: auto (its fastest verified export, else torch), "
        "torch, or one of its verified ONNX exports.",
    )
    store: StoreConfig = Field(default_factory=StoreConfig)
    retries: RetriesConfig = Field(default_factory=RetriesConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("a plain name: letters, digits, '-', '_', '.'")
        return v


def pin_model(config: ScoreConfig, store: Store) -> tuple[str, str]:
    """(a reference to exactly one model, its content fingerprint): ``NAME@production``
    becomes ``NAME@vNNNN``; a folder stays a folder."""
    from domaintune.models import ResolvedModel
    from domaintune.serving.predict import resolve

    model = resolve(config.model, store)
    pinned = f"{config.model.rsplit('@', 1)[0]}@{model.version}" if model.version else config.model
    return pinned, ResolvedModel(pinned, str(model.model_dir)).fingerprint()


def plan(config: ScoreConfig, source: Any, model_fingerprint: str, runtime: str = "torch") -> str:
    return hash_obj(
        STAGE,
        VERSION,
        model_fingerprint,
        source.fingerprint(),
        config.text_column,
        # an export's predictions are its own (keys of PyTorch's stay as they were)
        *([runtime] if runtime != "torch" else []),
    )


def score_file(
    config: ScoreConfig, url: str, store: Store, model: str, model_fingerprint: str
) -> ScoredFile:
    """Score the file at ``url`` with the pinned ``model`` (cached per model and file)."""
    from domaintune.readers.sources import resolve_sources
    from domaintune.serving.predict import choose_runtime, resolve

    (source,) = resolve_sources(url, "source", config.storage_options)
    runtime = choose_runtime(resolve(model, store), config.runtime, store)
    key = plan(config, source, model_fingerprint, runtime)
    return store.compute_once(
        STAGE,
        key,
        ScoredFile,
        lambda: _run(
            config, store, key, source, source.fingerprint(), model, model_fingerprint, runtime
        ),
    )


def _run(
    config: ScoreConfig,
    store: Store,
    key: str,
    source: Any,
    sha256: str,
    reference: str,
    model_fingerprint: str,
    runtime: str = "torch",
) -> ScoredFile:
    from domaintune.serving.predict import choose_runtime, predict_inputs, resolve

    model = resolve(reference, store)
    choose_runtime(model, runtime, store)
    if config.batch_size:
        model.batch_size = config.batch_size
    result, summary = predict_inputs(
        model, [source.url], config.text_column, config.storage_options
    )
    with store.writer(STAGE, key) as w:
        result.to_parquet(w.path / "predictions.parquet", index=False)
        manifest = ScoredFile(
            key=key,
            path=str(store.entry_path(STAGE, key)),
            fingerprint=hash_obj(key, summary["rows"], summary["counts"]),
            source=redact(source.url),
            sha256=sha256,
            model=reference,
            version=model.version,
            model_fingerprint=model_fingerprint,
            task_type=model.task_type,
            counts=summary["counts"],
            rows=summary["rows"],
            notes=summary["notes"],
            seconds=summary["seconds"],
        )
        w.manifest = manifest.model_dump(mode="json")
    log.info(
        "score: %s: %d rows by %s (%s)", manifest.source, manifest.rows, reference, manifest.counts
    )
    return manifest
