"""Batch predictions with a registered (or any fine-tuned) model: ``domaintune predict``.

    domaintune predict NAME@production data/*.csv --out predictions.parquet
    domaintune predict NAME@v0003 s3://bucket/new/*.jsonl --config configs/x.yaml --json
    domaintune predict path/to/model/folder reviews.txt

MODEL is a registry reference, ``NAME@production``, ``NAME@latest`` or ``NAME@vNNNN``, resolved
in the store of ``--store`` / ``--config`` (default ``./.domaintune``), or a model folder (a
registry version folder, its ``model/`` folder, or a finetune entry). INPUT goes through the
readers of the ingest stage (paths, globs, fsspec URLs; CSV / JSONL / Parquet / text / CoNLL by
suffix; encoding detection; records that do not parse are left out and counted) and needs no
label column. The output keeps every input column (as the readers read it: CSV values as text) and adds the task type's predictions;
its format follows the suffix of ``--out`` (``.parquet``, ``.csv``, ``.jsonl``), JSON Lines on
stdout without one. Rows are scored in batches of similar length, in the precision the model
trained in on this machine's kind (bf16 where the CPU has it).

What each task type adds is its own (``TaskType.predict``, in its module under
``domaintune/tasktypes/``); this module resolves the model, reads the inputs and writes the
outputs. Columns added per task type: ``text_classification``: ``predicted``, ``confidence``,
``prob_<label>`` per class; ``token_classification``: ``entities`` (type, character ``start`` /
``end``, ``text`` and ``score`` each) and ``entity_count``; ``question_answering`` (input columns
``question`` and ``context``): ``answer``, ``answer_start`` / ``answer_end`` in the context,
``answer_score``, ``no_answer``; ``causal_lm``: ``perplexity_tokens`` scored and ``perplexity``
per document; ``instruction_tuning`` (chat ``messages``, ``instruction`` [+ ``input``] or a
prompt in the text column): ``generated``. ``masked_lm`` models are not served (they are
encoders to fine-tune further): predict says so in one line.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from domaintune.errors import (
    ConfigError,
    DataError,
    ModelError,
    PredictError,
    shown,
    shown_list,
)
from domaintune.registry import REFERENCE as _REFERENCE
from domaintune.tasktypes import TaskType, get_task_type, task_type_names
from domaintune.tasktypes.predicting import PredictModel

log = logging.getLogger(__name__)

#: where the architecture of a plain model folder says which task type it was trained for
_HEADS = {
    "ForSequenceClassification": "text_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
    "ForCausalLM": "causal_lm",
    "ForMaskedLM": "masked_lm",  # known, so that predict says it does not serve it
}


def resolve(reference: str, store: Any = None) -> PredictModel:
    """The model of ``reference``: ``NAME@production|latest|vNNNN`` in ``store`` (a Store;
    default ``./.domaintune``), or a folder."""
    match = _REFERENCE.match(reference)
    folder = Path(reference)
    try:
        exists, is_dir = folder.exists(), folder.is_dir()
    except (OSError, ValueError):  # a name no file can have (too long, a NUL byte)
        exists = is_dir = False
    if match and not exists:
        return _from_registry(match["name"], match["version"], reference, store)
    if not is_dir:
        raise PredictError(
            f"{shown(reference)}: not a model folder and not a registry reference; rule: MODEL is "
            "NAME@production, NAME@latest, NAME@vNNNN or a folder holding a fine-tuned model"
        )
    return _from_folder(folder, reference)


def _from_registry(name: str, version: str, reference: str, store: Any) -> PredictModel:
    from domaintune.registry import Registry
    from domaintune.storage.store import Store

    registry = Registry(store if store is not None else Store(".domaintune"), name)
    try:  # the registry's one rule for production / latest / vNNNN and its errors
        chosen = registry.resolve(version, reference)
    except ModelError as exc:
        raise PredictError(str(exc)) from None
    model = _from_folder(registry.version_dir(chosen), reference)
    model.version = chosen
    return model


#: what ``--runtime`` may name: auto (the fastest verified export, else torch), torch, or an
#: ONNX export of the version (made by ``export.formats`` or ``domaintune export``)
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")


def _verified_exports(model: PredictModel, store: Any = None) -> dict[str, Any]:
    """The version's verified ONNX exports: those registered with it (``exports/<format>/``
    of the version) and those ``domaintune export`` made later into the store's export
    entries for the same model (local stores)."""
    from domaintune.exporting import ONNX_FILE, ONNX_FORMATS, read_record

    found: dict[str, Any] = {}
    version_dir = model.model_dir.parent
    marker = version_dir / "registration.json"
    if marker.is_file():
        for fmt, e in (json.loads(marker.read_text()).get("exports") or {}).items():
            folder = version_dir / e.get("path", f"exports/{fmt}")
            if fmt in ONNX_FORMATS and not e.get("refused") and (folder / ONNX_FILE).is_file():
                found[fmt] = {**e, "folder": folder}
    lineage = version_dir / "lineage.json"
    if store is not None and getattr(store, "local", False) and lineage.is_file():
        fingerprint = json.loads(lineage.read_text())["model"]["fingerprint"]
        stage_dir = Path(store.entry_path("export", "x")).parent
        for entry in sorted(stage_dir.glob("*/export.json")) if stage_dir.is_dir() else []:
            record = read_record(entry.parent) or {}
            fmt = record.get("format")
            if (
                fmt in ONNX_FORMATS
                and fmt not in found
                and record.get("model_fingerprint") == fingerprint
                and (entry.parent / "_COMPLETE.json").is_file()
            ):
                found[fmt] = {**record, "folder": entry.parent}
    return found


def choose_runtime(model: PredictModel, runtime: str = "auto", store: Any = None) -> str:
    """Set and return ``model.runtime``: ``auto`` takes, among the exports registered with
    the version, the one with the most texts per second in batches (as measured beside the
    PyTorch model when it was verified) where it beats PyTorch, else torch; so ``predict``,
    ``score`` and ``serve-model`` choose alike. A format named explicitly may also be an
    export ``domaintune export`` made later into ``store``; one not made is an error."""
    if runtime not in RUNTIMES:
        raise PredictError(f"--runtime {runtime}: unknown; allowed: {', '.join(RUNTIMES)}")
    if runtime == "torch":
        model.exports = {}
    else:
        model.exports = _verified_exports(model, None if runtime == "auto" else store)
    if runtime == "auto":

        def speed(e: dict[str, Any]) -> float:
            lat = e.get("latency") or {}
            return (lat.get("export") or {}).get("batch32_texts_per_s", 0.0) / max(
                (lat.get("torch") or {}).get("batch32_texts_per_s", 0.0), 1e-9
            )

        best = max(model.exports, key=lambda f: speed(model.exports[f]), default=None)
        runtime = best if best is not None and speed(model.exports[best]) > 1.0 else "torch"
    elif runtime != "torch" and runtime not in model.exports:
        raise PredictError(
            f"{model.reference}: no verified {runtime} export; rule: make it first with "
            f"`domaintune export {model.reference} --format {runtime}` (or export.formats)"
        )
    model.runtime = runtime
    return runtime


def _from_folder(folder: Path, reference: str) -> PredictModel:
    """A registry version folder (config.yaml + model/), a model folder inside one, a
    finetune entry, or a bare Hugging Face model folder with a task head."""
    from domaintune.config import RetrainConfig
    from domaintune.runconfig import complete

    model_dir = folder / "model" if (folder / "model" / "config.json").is_file() else folder
    if not (model_dir / "config.json").is_file():
        raise PredictError(
            f"{shown(reference)}: {shown(model_dir)} holds no model (no config.json)"
        )
    config = None
    for candidate in (model_dir.parent / "config.yaml", model_dir / "config.yaml"):
        if candidate.is_file():
            import yaml

            config = complete(RetrainConfig.model_validate(yaml.safe_load(candidate.read_text())))
            break
    hf = json.loads((model_dir / "config.json").read_text())
    if config is not None:
        task_type = config.task.type
    else:
        arch = " ".join(hf.get("architectures") or [])
        task_type = next((t for k, t in _HEADS.items() if k in arch), None)
        if task_type is None:
            raise PredictError(
                f"{reference}: cannot tell the task type of {model_dir} (architectures: "
                f"{arch or 'none'}); predict from a registry version, which records it"
            )
    id2label = hf.get("id2label") or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else []
    model = PredictModel(reference, model_dir, task_type, labels, config=config)
    if config is not None:
        model.text_column = config.data.text_column
        model.max_length = config.training.max_length
        model.batch_size = config.evaluation.batch_size
    return model


# ------------------------------------------------------------------------------ inputs


#: what each input column is for, and where its name comes from
_COLUMN_RULES = {
    "text": "the column the model was trained on (data.text_column), or --text-column",
    "question": "the column of the questions (data.question_column)",
    "context": "the column of the passages (data.context_column)",
    "prompt": "a column of chat messages (data.messages_column), of instructions "
    "(data.instruction_column, with data.input_column), or of prompts (--text-column)",
}


def read_inputs(
    specs: list[str],
    text_column: str,
    storage_options: dict[str, Any] | None = None,
    needs: list[tuple[str, tuple[str, ...]]] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Every input row (columns as read, plus ``_source`` and ``_row``) and notes. ``needs``:
    (role, column names of which one must be there), checked in each file; default the
    text column."""
    from domaintune.readers.sources import infer_format, read_file, resolve_sources
    from domaintune.redaction import redact

    try:
        files = resolve_sources(specs, field="INPUT", storage_options=storage_options)
        fmt = infer_format(files, None)
    except (ConfigError, DataError) as exc:
        raise PredictError(str(exc).replace("data.format: ", "INPUT: ")) from exc
    tables, notes, unparsed = [], [], []
    for f in files:
        held = len(unparsed)
        df, encoding = read_file(f, fmt, "auto", None, unparsed)
        text = text_column if fmt not in ("text", "conll") else "text"
        if fmt == "conll" and "tokens" in df.columns:
            df["text"] = df["tokens"].map(" ".join)
        for role, names in needs or [("text", (text_column,))]:
            names = tuple(text if n == text_column else n for n in names)
            if not any(n in df.columns for n in names):
                raise PredictError(
                    f"{redact(f.url)}: no {role} column {' or '.join(map(repr, names))} "
                    f"(columns: "
                    f"{shown_list(c for c in df.columns if not str(c).startswith('_'))}); "
                    f"rule: {_COLUMN_RULES[role]}"
                )
        df["_source"] = redact(f.url)
        if encoding and encoding != "utf-8":
            notes.append(f"{redact(f.url)}: decoded as {encoding}")
        if len(unparsed) > held:
            notes.append(
                f"{redact(f.url)}: {len(unparsed) - held} record(s) did not parse and were "
                f"left out (first: record {unparsed[held]['_row']}: "
                f"{unparsed[held]['_reasons'].removeprefix('parse: ')})"
            )
        tables.append(df)
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    return table, notes


# ------------------------------------------------------------------------- predicting


def _served(model: PredictModel) -> TaskType:
    """The model's task type, which predicts (a clear error where it does not)."""
    task = get_task_type(model.task_type)
    if not task.predicts:
        served = [n for n in task_type_names() if get_task_type(n).predicts]
        raise PredictError(
            f"{model.reference}: predict does not support task type {model.task_type!r} yet "
            f"(supported: {', '.join(served)})"
        )
    return task


def predict_table(model: PredictModel, table: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """``table`` with the predictions of ``model`` added (rows in their input order)."""
    return _served(model).predict(model, table, text_column, functools.partial(_load, model))


def _load(model: PredictModel) -> tuple[Any, Any, str]:
    """(tokenizer, model, precision), loaded as the evaluate stage loads a model to score, so
    that predictions on the test split are the evaluation's; with an ONNX runtime, the
    verified export in ONNX Runtime (``domaintune.exporting.OnnxNet``)."""
    from domaintune.config import TrainingConfig

    if model.runtime != "torch":
        from domaintune.exporting import load_onnx

        folder = model.exports[model.runtime]["folder"]
        model.notes.append(f"run by ONNX Runtime ({model.runtime} export, {folder})")
        return load_onnx(folder)
    from domaintune.loading import load_for_scoring

    config = model.config
    tokenizer, net, precision = load_for_scoring(
        str(model.model_dir),
        model.task_type,
        model.labels,
        config.training if config is not None else TrainingConfig(),
        bool(config.model.trust_remote_code) if config is not None else False,
    )
    model.notes.append(f"scored in {precision}")
    return tokenizer, net, precision


def _default_store() -> Any:
    from domaintune.storage.store import Store

    return Store(".domaintune")


# ---------------------------------------------------------------------------- output

_WRITERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}


def output_format(out: str | None) -> str:
    """The format of ``--out`` from its suffix (JSON Lines on stdout without one)."""
    if out is None:
        return "jsonl"
    suffix = Path(out).suffix.lower()
    if suffix not in _WRITERS:
        raise PredictError(
            f"--out {out}: unknown output format {suffix or '(no suffix)'!r}; rule: end the "
            f"file name in {', '.join(_WRITERS)}"
        )
    return _WRITERS[suffix]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def write_output(table: pd.DataFrame, out: str | None) -> None:
    fmt = output_format(out)
    if out is None:
        table.to_json(sys.stdout, orient="records", lines=True, force_ascii=False)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    if fmt == "parquet":
        table.to_parquet(tmp, index=False)
    elif fmt == "csv":  # lists (entities, tokens) as JSON text in a cell
        table.assign(
            **{
                c: table[c].map(lambda v: json.dumps(_plain(v), ensure_ascii=False))
                for c in table.columns
                if table[c].map(lambda v: isinstance(v, list | dict | np.ndarray)).any()
            }
        ).to_csv(tmp, index=False)
    else:
        table.to_json(tmp, orient="records", lines=True, force_ascii=False)
    tmp.replace(path)  # a reader never sees half a file


def predict(
    reference: str,
    inputs: list[str],
    out: str | None = None,
    store: Any = None,
    text_column: str | None = None,
    batch_size: int | None = None,
    runtime: str = "auto",
) -> dict[str, Any]:
    """Resolve, read, predict and write; returns a summary (model, version, runtime, rows,
    counts). ``runtime``: see :func:`choose_runtime`."""
    output_format(out)  # a bad --out fails before any work
    model = resolve(reference, store)
    choose_runtime(model, runtime, store if store is not None else _default_store())
    if batch_size:
        model.batch_size = batch_size
    result, summary = predict_inputs(model, inputs, text_column)
    write_output(result, out)
    return {
        "model": model.reference,
        "version": model.version,
        "model_dir": str(model.model_dir),
        "task_type": model.task_type,
        "runtime": model.runtime,
        "out": out,
        **summary,
    }


def predict_inputs(
    model: PredictModel,
    inputs: list[str],
    text_column: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(the inputs with the predictions of ``model``, {rows, counts, seconds, notes}): what
    ``domaintune predict`` writes and the ``score`` stage keeps."""
    task = _served(model)  # before any input is read
    column = text_column or model.text_column
    needs = task.predict_inputs(model, column)
    table, notes = read_inputs(inputs, column, storage_options, needs=needs)
    column = column if column in table.columns else "text"
    log.info("predict: %d rows with %s", len(table), model.describe())
    t0 = time.time()
    result = task.predict(model, table, column, functools.partial(_load, model))
    return result, {
        "rows": len(result),
        "counts": task.prediction_counts(result),
        "seconds": round(time.time() - t0, 2),
        "notes": notes + model.notes,
    }
