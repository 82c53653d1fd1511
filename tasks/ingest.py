"""ingest: input files -> immutable raw snapshot (Parquet) with a content fingerprint.

Reads CSV / JSONL (and JSON arrays, SQuAD's nested JSON) / Parquet / text / CoNLL / TMX files
from paths, globs, fsspec URLs or pkg:// package data,
maps the user's columns to the task's, normalises labels, and writes ``raw.parquet`` with the
source file and row of every example. Source files are only ever read.
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from domaintune.config import RetrainConfig
from domaintune.errors import DataError, shown_list
from domaintune.fingerprint import hash_dataframe, hash_obj, stable_json
from domaintune.readers.sources import (
    EMPTY_ROWS,
    LAYOUT_COLUMNS,
    SOURCE,
    SourceFile,
    infer_format,
    read_file,
    resolve_sources,
)
from domaintune.redaction import redact
from domaintune.storage.manifests import IngestedFile, RawSnapshot
from domaintune.storage.store import Store
from domaintune.tasktypes import get_task_type

log = logging.getLogger(__name__)

STAGE = "ingest"
# 2: rows repeating an earlier file are dropped; 3: extra columns, redacted sources; 4: CSV rows
# with every field empty skipped and counted
VERSION = "4"


def plan(
    config: RetrainConfig,
) -> tuple[str, list[tuple[str | None, SourceFile]], str, dict[str, str]]:
    """Resolve the inputs (per predefined split, if any) and compute the stage key without
    reading the data."""
    files: list[tuple[str | None, SourceFile]] = []
    for split, source in config.data.sources_by_split().items():
        field = "data.source" if split is None else f"data.splits.{split}"
        files += [(split, f) for f in resolve_sources(source, field, config.data.storage_options)]
    fmt = infer_format([f for _, f in files], config.data.format)
    hashes = {f.url: f.fingerprint() for _, f in files}
    key = hash_obj(
        STAGE,
        VERSION,
        {  # translation's languages write its prompts; unset (other tasks) they change no key
            **config.task.model_dump(include={"type", "labels", "iob_repair"}),
            **config.task.model_dump(
                include={"source_language", "target_language"}, exclude_none=True
            ),
            # a task type's own options (none: no term, the keys stay as they were)
            **({"options": config.task.options} if config.task.options else {}),
        },
        config.data.model_dump(exclude={"source", "splits", "max_invalid_share"}),
        # evaluation.split: by_column orders rows by a column of the data, kept as read
        *([{"split_column": keep}] if (keep := config.evaluation.split_column) else []),
        fmt,
        sorted(hashes.items()),
        [(split, f.url) for split, f in files],
    )
    return key, files, fmt, hashes


def _known_columns(config: RetrainConfig) -> set[str]:
    """Every column name the config maps (any task type), plus the reader's own."""
    names = {v for k, v in config.data.model_dump().items() if k.endswith("_column") and v}
    if config.evaluation.split_column:
        names.add(config.evaluation.split_column)
    return names | {"answer_text", "answer_start", "directory", "filename", "_row", "_source"}


def ingest(config: RetrainConfig, store: Store) -> RawSnapshot:
    key, files, fmt, hashes = plan(config)
    return store.compute_once(
        STAGE, key, RawSnapshot, lambda: _run(config, store, key, files, fmt, hashes)
    )


def _run(
    config: RetrainConfig,
    store: Store,
    key: str,
    files: list[tuple[str | None, SourceFile]],
    fmt: str,
    hashes: dict[str, str],
) -> RawSnapshot:
    task = get_task_type(config.task.type)
    tables: list[pd.DataFrame] = []
    sources: list[IngestedFile] = []
    known = _known_columns(config)
    ignored: dict[str, None] = {}
    unparsed: list[dict] = []  # data.on_invalid: quarantine: records that did not parse
    empty_rows = 0
    for split, f in files:
        held = len(unparsed)
        df, enc = read_file(
            f,
            fmt,
            config.data.encoding,
            config.data.delimiter,
            unparsed if config.data.on_invalid == "quarantine" else None,
        )
        empty_rows += df.attrs.get(EMPTY_ROWS, 0)
        for record in unparsed[held:]:
            record["_source"] = redact(f.url)
        # besides the configured columns: the reader's own (SQuAD's id, title) and those the
        # task type reads in this file (translation's language columns, ShareGPT's)
        used = known | set(df.attrs.get(LAYOUT_COLUMNS, ())) | task.columns_read(df, config, f.url)
        extra = [str(c) for c in df.columns if str(c) not in used]
        if extra and config.data.extra_columns == "error":
            raise DataError(
                f"{f.url}: unexpected column(s) {shown_list(extra, quote=True)}; rule: "
                "only the configured columns (data.extra_columns: error; set it to ignore to "
                "leave such columns out)"
            )
        ignored.update(dict.fromkeys(extra))
        kept = config.evaluation.split_column
        original = df[["_row", kept]] if kept and kept in df.columns else None
        df = task.map_columns(df, config, f.url)
        if original is not None and kept not in df.columns:  # the task type keeps its own
            values = original.drop_duplicates("_row").set_index("_row")[kept]
            df[kept] = df["_row"].map(values)
        # provenance keeps where a row came from, never the credentials in that URL
        df["_source"] = redact(f.url)
        if split is not None:
            df["_split"] = split
        tables.append(df)
        sources.append(
            IngestedFile(
                path=redact(f.url), sha256=hashes[f.url], rows=len(df), encoding=enc, split=split
            )
        )
    raw = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    repeats = 0
    if config.data.splits is None and len(tables) > 1 and fmt in ("csv", "jsonl", "parquet", "tmx"):
        # tables of records (not one document per file): later exports may repeat earlier ones
        raw, repeats = drop_repeats_of_earlier_files(raw, task.raw_columns)
    raw, labels, notes = task.normalize_labels(raw, config)
    if repeats:
        notes.append(
            f"{repeats} row(s) repeat rows of earlier files (accumulated data, e.g. a landing "
            "zone's overlapping exports) and were left out of the snapshot; the files are "
            "unchanged"
        )
    if empty_rows:
        notes.append(
            f"{empty_rows} CSV row(s) with every field empty (a spreadsheet export's padding) "
            "were skipped; the files are unchanged"
        )
    if ignored:
        notes.append(f"column(s) not used by {config.task.type}, left out: {shown_list(ignored)}")
    if unparsed:
        notes.append(
            f"{len(unparsed)} record(s) did not parse (first: "
            f"{unparsed[0]['_reasons'].removeprefix('parse: ')}); held "
            "for the quarantine (data.on_invalid: quarantine)"
        )
    raw["_row"] = raw["_row"].astype("int64")
    fingerprint = hash_dataframe(raw)
    if unparsed:  # the quarantine depends on them: so must every key downstream
        fingerprint = hash_obj(fingerprint, hash_dataframe(pd.DataFrame(unparsed)), length=32)
    counts = task.label_counts(raw)
    encodings = sorted({s.encoding for s in sources if s.encoding and s.encoding != "utf-8"})
    if encodings:
        notes.append(f"non-UTF-8 input decoded as {', '.join(encodings)}")
    with store.writer(STAGE, key) as w:
        raw.to_parquet(w.path / "raw.parquet", index=False)
        if unparsed:
            pd.DataFrame(unparsed).to_parquet(w.path / "unparsed.parquet", index=False)
        manifest = RawSnapshot(
            key=key,
            path=str(store.entry_path(STAGE, key)),
            fingerprint=fingerprint,
            rows=len(raw),
            columns=[str(c) for c in raw.columns],
            sources=sources,
            labels=labels,
            label_counts=counts,
            notes=notes,
            unparsed_rows=len(unparsed),
            empty_rows=empty_rows,
        )
        w.manifest = manifest.model_dump(mode="json")
        (w.path / "manifest.json").write_text(stable_json(w.manifest))
    for note in notes:
        log.info("ingest: %s", note)
    log.info("ingest: %d rows from %d file(s) -> %s", len(raw), len(files), manifest.path)
    return manifest


def drop_repeats_of_earlier_files(
    raw: pd.DataFrame, columns: tuple[str, ...]
) -> tuple[pd.DataFrame, int]:
    """Rows whose content (all of ``columns``) already appeared in an earlier file, in file
    order. Repeats inside one file stay: the contract judges those."""
    cols = [c for c in columns if c in raw.columns]
    keys = raw[cols].apply(lambda r: json.dumps(list(r), default=str, sort_keys=True), axis=1)
    earlier: set[str] = set()
    keep = pd.Series(True, index=raw.index)
    for _, idx in raw.groupby(SOURCE, sort=False).groups.items():
        these = keys.loc[idx]
        keep.loc[idx] = ~these.isin(earlier)
        earlier.update(these)
    dropped = int((~keep).sum())
    return (raw[keep].reset_index(drop=True) if dropped else raw), dropped
