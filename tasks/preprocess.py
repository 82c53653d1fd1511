"""preprocess: raw snapshot -> cleaned, de-duplicated, split and tokenized Parquet per split.

- Cleaning: HTML entities, Unicode normalisation, whitespace (configurable).
- De-duplication: exact duplicate texts after cleaning, keeping the first.
- Split (evaluation.split): random, by a seeded hash of each row's text against fixed
  thresholds: the split depends only on the seed and the data, not on file order, and an
  example keeps its split when data is added. Time-aware: newest_files (the test split is
  the newest source file(s)) or by_column (the rows with the highest values of a column);
  validation and train by the hash among the other rows.
- Continual training (TrainSelection): the train split keeps the new files' rows plus a
  seeded replay sample of earlier rows; validation and test are not filtered.
- Tokenization: the model's fast tokenizer through ``datasets.map`` (batched, several
  processes for large data), truncation to ``training.max_length`` and no padding: batches
  are padded dynamically at training time.

The key covers the raw data, this stage's config, the tokenizer's file contents and the
tokenizer library versions, so a cache built with one tokenizer is never reused for another.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from domaintune.chaining import resolve_config_model
from domaintune.config import EvaluationConfig, RetrainConfig
from domaintune.errors import ConfigError, DataError, ModelError
from domaintune.fingerprint import hash_local_file, hash_obj, library_versions, stable_json
from domaintune.models import ResolvedModel
from domaintune.readers.sources import SOURCE, row_ids
from domaintune.storage.manifests import RawSnapshot, SplitInfo, SplitManifest, ValidationReport
from domaintune.storage.store import Store
from domaintune.tasktypes import get_task_type
from domaintune.tasktypes.base import TokenizeSettings

log = logging.getLogger(__name__)

STAGE = "preprocess"
VERSION = "4"  # 2: splits keep _example ids (windows of long examples); 3: duplicates by the
# task type's key, its own split stats (chat examples fitted by domaintune.chat); 4: a row's
# split from its own text and evaluation.split_seed (fixed thresholds), not a per-label rank
SPLITS = ("train", "validation", "test")


class HeldOut(NamedTuple):
    """The data of a recipe's final stage: its validation and test texts are left out of an
    earlier stage's data (domaintune.recipes)."""

    config: RetrainConfig
    raw: RawSnapshot
    validation: ValidationReport | None = None

    def fingerprint(self) -> str:
        """What decides the final stage's held-out texts: its data and how it splits."""
        c = self.config
        return hash_obj(
            "held-out",
            VERSION,
            self.raw.fingerprint,
            self.validation.quarantine_fingerprint if self.validation else None,
            self.raw.labels,
            c.task.type,
            c.preprocess.model_dump(exclude={"num_proc"}),
            _split_settings(c),
        )

    def texts(self) -> set[str]:
        parts, _ = split_parts(self.config, self.raw, self.validation)
        return {t for name in ("validation", "test") for t in parts[name]["text"]}


@dataclass(frozen=True)
class TrainSelection:
    """start_from: champion: train on the new files' rows plus a replay sample of earlier
    rows. Only the train split is selected: validation and test keep every row, so the
    guard can score the champion's own test rows and the new files' rows apart (by
    ``_source``)."""

    new_sources: tuple[str, ...]  # _source values of the files that landed since the champion
    replay_share: float  # share of the resulting train rows drawn from earlier rows
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "new_sources", tuple(self.new_sources))
        if not 0 <= self.replay_share < 1:
            raise ValueError(f"replay_share must be in [0, 1), got {self.replay_share}")

    def key(self) -> dict:
        """What goes into the preprocess key (the files as a set: their order means nothing)."""
        return {
            "new_sources": sorted(set(self.new_sources)),
            "replay_share": float(self.replay_share),
            "seed": int(self.seed),
        }


def _split_settings(config: RetrainConfig) -> dict[str, Any]:
    ev = config.evaluation
    limit = ev.max_test_rows
    return {
        "split_seed": ev.split_seed,
        "test_size": ev.test_size,
        "val_size": ev.val_size,
        **({"max_test_rows": limit} if limit else {}),
        # random (the default) adds no term: the keys of existing entries stay as they were
        **({"split": ev.split} if ev.split != "random" else {}),
        **({"split_column": ev.split_column} if ev.split_column else {}),
    }


def plan(
    config: RetrainConfig,
    raw: RawSnapshot,
    validation: ValidationReport | None = None,
    held_out: HeldOut | None = None,
    *,
    selection: TrainSelection | None = None,
) -> tuple[str, ResolvedModel, str]:
    model = resolve_config_model(config)
    tok_fp = model.tokenizer_fingerprint()
    quarantined = validation.quarantine_fingerprint if validation else None
    key = hash_obj(
        STAGE,
        VERSION,
        raw.fingerprint,
        *([{"quarantined": quarantined}] if quarantined else []),
        *([{"held_out": held_out.fingerprint()}] if held_out is not None else []),
        raw.labels,
        config.task.type,
        *([{"task_options": config.task.options}] if config.task.options else []),
        config.preprocess.model_dump(exclude={"num_proc"}),
        {**TokenizeSettings.of(config).key(), **_split_settings(config)},
        *([{"selection": selection.key()}] if selection is not None else []),
        tok_fp,
        library_versions("transformers", "tokenizers", "datasets"),
    )
    return key, model, tok_fp


def split_point(text: str, seed: int) -> float:
    """Where ``text`` falls in [0, 1): the first 8 bytes of sha256(seed, text). Its split
    depends on this alone (split_frame)."""
    digest = hashlib.sha256(f"{seed}\x1f{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_frame(
    df: pd.DataFrame, test_size: float, val_size: float, seed: int
) -> dict[str, pd.DataFrame]:
    """Split rows by their own content: a row is test when its ``split_point`` is below
    ``test_size``, validation below ``test_size + val_size``, train otherwise. A row never
    changes split as data is added or removed, or when the training seed changes; each
    split holds about its share of every label (in expectation, not exactly). Rows keep
    the order of their split points.

    Tiny data only: a split the thresholds leave empty takes the row whose point is nearest
    its range (from a split that keeps at least one row), so that 25 rows do not fail by
    chance. With every split non-empty, as on any real data, no row moves."""
    point = df["text"].map(lambda t: split_point(str(t), seed))
    df = df.assign(_point=point).sort_values("_point", kind="stable")
    ranges = {
        "test": (0.0, test_size),
        "validation": (test_size, test_size + val_size),
        "train": (test_size + val_size, 1.0),
    }
    split = pd.Series("train", index=df.index)
    split[df["_point"] < test_size + val_size] = "validation"
    split[df["_point"] < test_size] = "test"
    if len(df) >= len(SPLITS):
        for name in ("train", "validation", "test"):
            low, high = ranges[name]
            if high <= low or (split == name).any():
                continue
            distance = (low - df["_point"]).clip(lower=0) + (df["_point"] - high).clip(lower=0)
            sizes = split.value_counts()
            for row in distance.sort_values(kind="stable").index:
                if sizes[split[row]] > 1:
                    split[row] = name
                    break
    return {s: df[split == s].drop(columns="_point").reset_index(drop=True) for s in SPLITS}


def split_rows(
    df: pd.DataFrame, evaluation: EvaluationConfig
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The split ``evaluation.split`` asks for, and what it decided (for the stats)."""
    ev = evaluation
    if ev.split == "newest_files":
        return split_newest_files(df, ev.test_size, ev.val_size, ev.split_seed, ev.split_column)
    if ev.split == "by_column":  # the config requires split_column with by_column
        return split_by_column(df, str(ev.split_column), ev.test_size, ev.val_size, ev.split_seed)
    return split_frame(df, ev.test_size, ev.val_size, ev.split_seed), {}


def split_newest_files(
    df: pd.DataFrame, test_size: float, val_size: float, seed: int, column: str | None = None
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Time-aware: the test split is the rows of the newest source file(s) (``_source``),
    whole files from the newest back until at least ``test_size`` of the rows are test; at
    least one file and never every file. Newest: last in the natural order of the files'
    paths (``part-9`` before ``part-10``; ISO dates sort as dates), or with ``column`` the
    file whose largest value of it is largest (files without values oldest). The other
    rows: validation and train as ``_split_around`` says."""
    df = df.reset_index(drop=True)
    if SOURCE not in df.columns:
        raise DataError(_missing_column(SOURCE, df, "evaluation.split: newest_files"))
    sources = df[SOURCE].astype(str)
    counts = sources.value_counts()
    info: dict[str, Any] = {"split": "newest_files"}
    if column is None:
        files = sorted(counts.index, key=_natural)
    else:
        if column not in df.columns:
            raise DataError(_missing_column(column, df, "evaluation.split_column"))
        values, info["split_column_compared_as"] = _orderable(df[column])
        valued = values.dropna()
        latest = valued.groupby(sources[valued.index]).max().to_dict()
        files = sorted(
            counts.index,
            key=lambda f: (f in latest, latest.get(f), _natural(f)),
        )
        info["split_column"] = column
    if len(files) < 2:
        raise DataError(
            f"evaluation.split: newest_files needs rows from at least two source files, found "
            f"{len(files)} ({files[0] if files else 'none'}); rule: the newest file(s) are the "
            "test split and earlier files train (land more files, or use evaluation.split: "
            "random)"
        )
    chosen: list[str] = []
    held = 0
    for name in reversed(files[1:]):  # never the oldest: some file must be left to train on
        chosen.append(name)
        held += int(counts[name])
        if held >= test_size * len(df):
            break
    info["test_sources"] = chosen
    info["test_share"] = round(held / len(df), 4)
    return _split_around(df, sources.isin(chosen), test_size, val_size, seed), info


def split_by_column(
    df: pd.DataFrame, column: str, test_size: float, val_size: float, seed: int
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Time-aware: the test split is the rows with the highest values of ``column``, the top
    ``test_size`` share (at least one row); rows equal to the lowest value taken are taken
    too, so the cut never separates equal values. Rows without a value are never test.
    The other rows: validation and train as ``_split_around`` says."""
    df = df.reset_index(drop=True)
    if column not in df.columns:
        raise DataError(_missing_column(column, df, "evaluation.split_column"))
    values, how = _orderable(df[column])
    valued = values.dropna()
    if valued.empty:
        raise DataError(
            f"evaluation.split_column: column {column!r} has no values in any of the "
            f"{len(df)} rows; rule: split: by_column orders rows by their values"
        )
    wanted = min(len(valued), max(1, math.ceil(test_size * len(df))))
    cut = valued.sort_values(ascending=False, kind="stable").iloc[wanted - 1]
    test = pd.Series(False, index=df.index)
    test[valued.index] = (valued >= cut).to_numpy()
    if test.all():
        raise DataError(
            f"evaluation.split_column: every row would be test: the top {test_size:g} of the "
            f"{len(df)} rows by {column!r} ties with its lowest value ({cut}); rule: equal "
            "values stay together and rows with lower values must remain to train on"
        )
    info = {
        "split": "by_column",
        "split_column": column,
        "split_column_compared_as": how,
        "test_from_value": str(cut),
        "test_share": round(int(test.sum()) / len(df), 4),
        "rows_without_split_value": len(df) - len(valued),
    }
    return _split_around(df, test, test_size, val_size, seed), info


def _split_around(
    df: pd.DataFrame, test: pd.Series, test_size: float, val_size: float, seed: int
) -> dict[str, pd.DataFrame]:
    """``test`` (a mask) is the test split, in the order of its rows' split points. The
    other rows are validation when their split point is below val_size / (1 - test_size)
    (about val_size of all rows), train otherwise: a fixed threshold, so a row outside the
    test split keeps its split as files land."""
    rest = split_frame(df[~test], 0.0, val_size / (1 - test_size), seed)
    held = df[test]
    point = held["text"].map(lambda t: split_point(str(t), seed))
    held = held.assign(_point=point).sort_values("_point", kind="stable")
    return {
        "train": rest["train"],
        "validation": rest["validation"],
        "test": held.drop(columns="_point").reset_index(drop=True),
    }


_DIGITS = re.compile(r"(\d+)")


def _natural(name: str) -> tuple[tuple[str | int, ...], str]:
    """Natural order: digit runs compare as numbers (part-9 before part-10)."""
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _orderable(values: pd.Series) -> tuple[pd.Series, str]:
    """A column's values as they compare (blank and missing: missing), and how: numbers and
    date/times stored as such as they are; text as numbers when every value is one, else as
    date/times (UTC) when every value parses as one, else as text."""
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
        return values, "stored"
    text = values[values.notna()].astype(str).str.strip()
    text = text[text != ""]
    number = pd.to_numeric(text, errors="coerce")
    if number.notna().all():
        return number.reindex(values.index), "number"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            when = pd.to_datetime(text, utc=True, format="mixed")
        return when.reindex(values.index), "datetime"
    except (ValueError, TypeError, OverflowError):
        return text.reindex(values.index), "text"


def _missing_column(column: str, df: pd.DataFrame, field: str) -> str:
    present = ", ".join(str(c) for c in df.columns)
    return (
        f"{field}: no column {column!r} in the data (columns: {present}); rule: the column "
        "must be in the raw snapshot (kept through ingest)"
    )


def select_train(
    train: pd.DataFrame, selection: TrainSelection
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Continual training: the train rows of the new files, all of them, plus a seeded
    sample of the earlier train rows making ``replay_share`` of the result (as many as
    there are, at most). The sample is the rows whose seeded text hash comes first, so
    adding data changes it little. Rows keep their order."""
    train = train.reset_index(drop=True)
    new = train[SOURCE].astype(str).isin(set(selection.new_sources))
    n_new = int(new.sum())
    if n_new == 0:
        named = ", ".join(selection.new_sources[:3]) or "none given"
        more = len(selection.new_sources) - 3
        raise DataError(
            f"preprocess: none of the {len(train)} train rows come from the new files "
            f"({named}{f' and {more} more' if more > 0 else ''}); rule: start_from: champion "
            "trains on the rows of the files that landed since the champion was trained "
            "(land new files, or use retrain.start_from: base)"
        )
    earlier = train[~new]
    share = selection.replay_share
    n_replay = min(len(earlier), round(n_new * share / (1 - share))) if share > 0 else 0
    order = earlier["text"].map(
        lambda t: hashlib.sha256(f"{selection.seed}\x1freplay\x1f{t}".encode()).hexdigest()
    )
    replay = order.sort_values(kind="stable").index[:n_replay]
    kept = train[new | train.index.isin(replay)].reset_index(drop=True)
    return kept, {
        "train_rows_new": n_new,
        "train_rows_replay": int(n_replay),
        "train_rows_available_earlier": len(earlier),
    }


def sample_rows(part: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """``limit`` rows of a split, the same ones every run: those whose seeded text hash
    comes first (as the split orders them), so adding data changes the sample little."""
    order = part["text"].map(
        lambda t: hashlib.sha256(f"{seed}\x1ftest\x1f{t}".encode()).hexdigest()
    )
    keep = order.sort_values(kind="stable").index[:limit]
    return part.loc[sorted(keep)].reset_index(drop=True)


def _num_proc(setting: int | str, rows: int) -> int:
    if setting != "auto":
        return max(1, int(setting))
    return max(1, min(os.cpu_count() or 1, 8, math.ceil(rows / 2000)))


def load_fast_tokenizer(model: ResolvedModel, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            model.path, use_fast=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise ModelError(
            f"model.name_or_path: cannot load a tokenizer from {model.path}: {exc}"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(
            f"model.name_or_path: {model.name} has no fast tokenizer (tokenizer.json); rule: "
            "domaintune needs a fast tokenizer for offsets and batched tokenization"
        )
    _check_tokenizer_fits_model(tok, model)
    return tok


def _check_tokenizer_fits_model(tok: Any, model: ResolvedModel) -> None:
    """A tokenizer copied from another model produces ids the embedding matrix does not
    have (an index error deep in training) or, worse, ids that mean other tokens."""
    import json as _json
    from pathlib import Path

    cfg_path = Path(model.path) / "config.json"
    if not cfg_path.is_file():
        return
    cfg = _json.loads(cfg_path.read_text())
    rows = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if rows and len(tok) > int(rows):
        raise ModelError(
            f"model.name_or_path {model.path}: the tokenizer has {len(tok)} tokens but the "
            f"model's embedding matrix has {rows} rows (config.json vocab_size); rule: the "
            "tokenizer must be the model's own (ids beyond the matrix cannot be embedded)"
        )


def preprocess(
    config: RetrainConfig,
    raw: RawSnapshot,
    store: Store,
    validation: ValidationReport | None = None,
    held_out: HeldOut | None = None,
    *,
    selection: TrainSelection | None = None,
) -> SplitManifest:
    """``validation``: the rows its quarantine lists (data.on_invalid: quarantine) are left
    out of every split. ``held_out``: a recipe's final stage, whose validation and test
    texts are left out of this (earlier) stage's data. ``selection``: continual training
    (retrain.start_from: champion), the train split's rows (select_train)."""
    key, model, tok_fp = plan(config, raw, validation, held_out, selection=selection)
    return store.compute_once(
        STAGE,
        key,
        SplitManifest,
        lambda: _run(config, raw, store, key, model, tok_fp, validation, held_out, selection),
    )


def split_parts(
    config: RetrainConfig,
    raw: RawSnapshot,
    validation: ValidationReport | None = None,
    held_out: HeldOut | None = None,
    *,
    selection: TrainSelection | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The raw snapshot cleaned, de-duplicated and split (before tokenization), and what
    was dropped on the way. With a ``selection``, the train split's rows are selected
    after splitting (validation and test keep every row)."""
    task = get_task_type(config.task.type)
    labels = raw.labels
    df = pd.read_parquet(raw.table)
    stats: dict[str, Any] = {"raw_rows": len(df)}
    if validation is not None and validation.quarantine_table:
        bad = pd.read_parquet(validation.quarantine_table, columns=["_source", "_row"])
        keep = ~row_ids(df).isin(set(row_ids(bad)))
        stats["quarantined"] = int((~keep).sum())
        df = df[keep]
    df = task.usable_rows(df, labels)
    stats["dropped_invalid"] = stats["raw_rows"] - stats.get("quarantined", 0) - len(df)
    before = len(df)
    df = task.clean(df, config)
    stats["dropped_blank_after_cleaning"] = before - len(df)
    predefined = "_split" in df.columns
    if config.preprocess.drop_duplicates:
        key = list(task.duplicate_key)  # the text, or the whole example (prompt and answer)
        if predefined:  # within a split, and never in an official test set: it stays as published
            dup = df.duplicated(["_split", *key], keep="first") & (df["_split"] != "test")
        else:
            dup = df.duplicated(key, keep="first")
        targets = df[task.target_column].astype(str)
        conflicting = targets[df["text"].isin(df.loc[dup, "text"])].groupby(df["text"]).nunique()
        stats["dropped_duplicates"] = int(dup.sum())
        stats["duplicate_texts_with_conflicting_labels"] = int((conflicting > 1).sum())
        df = df[~dup]
    if held_out is not None:  # never train an earlier stage on the final stage's held-out text
        kept = ~df["text"].isin(held_out.texts())
        stats["held_out_of_final_stage"] = int((~kept).sum())
        df = df[kept]
    if predefined and config.evaluation.split != "random":
        raise ConfigError(
            f"evaluation.split: {config.evaluation.split} does not apply to data with "
            "predefined splits (data.splits), whose test split is the one given; rule: use "
            "evaluation.split: random there"
        )
    if predefined:
        parts = {name: df[df["_split"] == name].drop(columns="_split") for name in SPLITS}
        if parts["validation"].empty:  # carve validation from train, stratified as usual
            carved = split_frame(
                parts["train"], 0.0, config.evaluation.val_size, config.evaluation.split_seed
            )
            parts["validation"], parts["train"] = carved["validation"], carved["train"]
        else:
            parts = {n: p.reset_index(drop=True) for n, p in parts.items()}
    else:
        parts, decided = split_rows(df, config.evaluation)
        stats.update(decided)
    limit = config.evaluation.max_test_rows
    if limit and len(parts["test"]) > limit:
        stats["test_rows_before_sampling"] = len(parts["test"])
        parts["test"] = sample_rows(parts["test"], limit, config.evaluation.split_seed)
    if selection is not None:
        parts["train"], chosen = select_train(parts["train"], selection)
        stats.update(chosen)
    for name, part in parts.items():
        if part.empty:
            raise DataError(
                f"preprocess: the {name} split is empty ({len(df)} usable rows); rule: enough "
                "rows per label for train, validation and test (add data or change "
                "evaluation.test_size / val_size)"
            )
    return parts, stats


def _run(
    config: RetrainConfig,
    raw: RawSnapshot,
    store: Store,
    key: str,
    model: ResolvedModel,
    tok_fp: str,
    validation: ValidationReport | None = None,
    held_out: HeldOut | None = None,
    selection: TrainSelection | None = None,
) -> SplitManifest:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    task = get_task_type(config.task.type)
    labels = raw.labels
    parts, stats = split_parts(config, raw, validation, held_out, selection=selection)
    tokenizer = load_fast_tokenizer(model, config.model.trust_remote_code)
    task.check_tokenizer(tokenizer, config.task)
    settings = TokenizeSettings.of(config)
    splits: dict[str, SplitInfo] = {}
    with store.writer(STAGE, key) as w:
        entry = store.entry_path(STAGE, key)
        for name, part in parts.items():
            # _example numbers the examples of a split: a long one may become several windows
            ds = Dataset.from_pandas(part.assign(_example=range(len(part))), preserve_index=False)
            ds = ds.map(
                task.tokenize,
                batched=True,
                batch_size=1000,
                remove_columns=ds.column_names,  # tokenize returns every column it keeps
                num_proc=_num_proc(config.preprocess.num_proc, len(ds)) if len(ds) > 1 else None,
                fn_kwargs={"tokenizer": tokenizer, "settings": settings, "labels": labels},
                desc=f"tokenize {name}",
            )
            ds, pack_stats = task.pack(ds, tokenizer, settings)
            if pack_stats:
                stats[f"{name}_packing"] = pack_stats
            out = w.path / f"{name}.parquet"
            ds.to_parquet(str(out))
            lengths = np.asarray(ds["length"])
            stats[f"{name}_windows"] = len(ds)
            stats[f"{name}_tokens"] = {
                "p50": int(np.percentile(lengths, 50)),
                "p95": int(np.percentile(lengths, 95)),
                "max": int(lengths.max()),
                "truncated_share": float((lengths >= settings.max_length).mean())
                if task.cuts_long_texts
                else 0.0,
                **task.split_stats(ds),
            }
            splits[name] = SplitInfo(
                path=str(entry / f"{name}.parquet"),
                rows=len(part),
                fingerprint=hash_local_file(out)[:32],
                label_counts=task.label_counts(part),
            )
        manifest = SplitManifest(
            key=key,
            path=str(entry),
            fingerprint=hash_obj(key, {n: s.fingerprint for n, s in splits.items()}),
            splits=splits,
            labels=labels,
            tokenizer_fingerprint=tok_fp,
            stats=stats,
        )
        w.manifest = manifest.model_dump(mode="json")
        (w.path / "manifest.json").write_text(stable_json(w.manifest))
    log.info(
        "preprocess: %s -> %s",
        ", ".join(f"{n} {s.rows}" for n, s in splits.items()),
        manifest.path,
    )
    return manifest
