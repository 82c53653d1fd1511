import pandas as pd
import pytest
from pydantic import ValidationError

from domaintune.config import EvaluationConfig
from domaintune.errors import DataError
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import (
    TrainSelection,
    _split_settings,
    plan,
    preprocess,
    select_train,
    split_by_column,
    split_frame,
    split_newest_files,
    split_parts,
)
from tests.conftest import write_csv


def _splits(tmp_path, make_config, rows, **over):
    src = tmp_path / "d.csv"
    if not src.exists():
        write_csv(src, rows(20))
    cfg = make_config(src, **over)
    store = Store(cfg.store.root)
    return cfg, preprocess(cfg, ingest(cfg, store), store)


def test_split_is_deterministic_order_independent_and_near_its_shares(rows):
    df = pd.DataFrame(rows(400))  # 1,200 rows, three labels
    a = split_frame(df, 0.2, 0.1, seed=3)
    b = split_frame(df.sample(frac=1, random_state=1), 0.2, 0.1, seed=3)
    for name in a:
        assert a[name]["text"].tolist() == b[name]["text"].tolist()
    assert sum(len(p) for p in a.values()) == len(df)
    assert set(a["train"]["text"]).isdisjoint(a["test"]["text"])
    assert set(a["train"]["text"]).isdisjoint(a["validation"]["text"])
    # about its share of every label (a binomial draw: 3 standard deviations)
    for name, share in (("test", 0.2), ("validation", 0.1)):
        for label, n in a[name]["label"].value_counts().items():
            total = int((df["label"] == label).sum())
            sd = (total * share * (1 - share)) ** 0.5
            assert abs(n - total * share) < 3 * sd, (name, label, n, total)
    c = split_frame(df, 0.2, 0.1, seed=4)  # the split's own seed draws other splits
    assert c["test"]["text"].tolist() != a["test"]["text"].tolist()


def _split_of(parts):
    return {t: name for name, p in parts.items() for t in p["text"]}


def test_no_row_changes_split_when_data_is_added_or_removed(rows):
    df = pd.DataFrame(rows(100))
    before = _split_of(split_frame(df, 0.15, 0.1, seed=0))
    # a landed file whose rows mostly fall low (the case a per-label rank got wrong): many
    # new rows, then only the first third of the old ones
    new = pd.DataFrame(
        [{"text": f"new finance headline number {i}", "label": "neutral"} for i in range(500)]
    )
    after = _split_of(split_frame(pd.concat([df, new]), 0.15, 0.1, seed=0))
    assert {t: after[t] for t in before} == before
    fewer = _split_of(split_frame(df.iloc[: len(df) // 3], 0.15, 0.1, seed=0))
    assert all(before[t] == name for t, name in fewer.items())


def test_the_training_seed_does_not_move_rows_between_splits(tmp_path, make_config, rows):
    def texts(name, **over):  # each run in a store of its own: nothing is reused
        folder = tmp_path / name
        folder.mkdir()
        _, splits = _splits(folder, make_config, rows, store={"root": str(folder / "s")}, **over)
        return {n: sorted(pd.read_parquet(s.path)["text"]) for n, s in splits.splits.items()}

    seed_42 = texts("a", training={"seed": 42})
    assert texts("b", training={"seed": 43}) == seed_42
    assert texts("c", evaluation={"split_seed": 7})["test"] != seed_42["test"]


def test_cleaning_dedupe_and_tokenized_parquet(tmp_path, make_config, rows):
    r = rows(20)
    r.append({"text": "Profit &amp; growth   beat\n\nrecord", "label": "positive"})
    r.append(
        {"text": "Profit & growth beat record", "label": "positive"}
    )  # duplicate after cleaning
    write_csv(tmp_path / "d.csv", r)
    cfg, splits = _splits(tmp_path, make_config, rows)
    assert splits.stats["dropped_duplicates"] == 1
    assert set(splits.splits) == {"train", "validation", "test"}
    assert sum(s.rows for s in splits.splits.values()) == 61
    frames = {n: pd.read_parquet(s.path) for n, s in splits.splits.items()}
    texts = pd.concat(frames.values())["text"]
    assert "Profit & growth beat record" in set(texts)
    train = frames["train"]
    assert {"input_ids", "attention_mask", "labels", "length", "_row", "_source"} <= set(
        train.columns
    )
    lengths = train["input_ids"].map(len)
    assert lengths.nunique() > 1, "no padding at preprocessing time: batches are padded dynamically"
    assert lengths.max() <= cfg.training.max_length
    assert set(train["labels"]) == {0, 1, 2}


def test_cache_key_follows_max_length_and_tokenizer_content(
    tmp_path, make_config, rows, other_tokenizer_model
):
    _, first = _splits(tmp_path, make_config, rows)
    _, again = _splits(tmp_path, make_config, rows)
    assert again.reused and again.key == first.key
    _, longer = _splits(tmp_path, make_config, rows, training={"max_length": 48})
    assert longer.key != first.key and not longer.reused
    _, other = _splits(
        tmp_path, make_config, rows, model={"name_or_path": str(other_tokenizer_model)}
    )
    assert other.key != first.key and other.tokenizer_fingerprint != first.tokenizer_fingerprint


def test_multiprocess_tokenization_gives_the_same_splits(tmp_path, make_config, rows):
    write_csv(tmp_path / "d.csv", rows(20))
    _, one = _splits(tmp_path, make_config, rows, preprocess={"num_proc": 1})
    _, two = _splits(
        tmp_path,
        make_config,
        rows,
        preprocess={"num_proc": 2},
        store={"root": str(tmp_path / "s2")},
    )
    assert not two.reused
    assert {n: s.fingerprint for n, s in two.splits.items()} == {
        n: s.fingerprint for n, s in one.splits.items()
    }


def test_truncated_share_counts_cut_texts_only(tmp_path, make_config, rows):
    """A classifier's text longer than max_length is cut: counted. (Packed LM blocks and
    NER / QA windows lose nothing: 0, tests/tasks/test_causal_lm.py.)"""
    _, short = _splits(tmp_path, make_config, rows, training={"max_length": 128})
    _, cut = _splits(tmp_path, make_config, rows, training={"max_length": 8})
    assert short.stats["train_tokens"]["truncated_share"] == 0.0
    assert cut.stats["train_tokens"]["truncated_share"] == 1.0


def test_max_test_rows_scores_the_same_sample_every_run(tmp_path, make_config, rows):
    """evaluation.max_test_rows: a seeded sample of the test split, stable when data grows;
    the rows left out are trained on nowhere."""
    cfg, full = _splits(tmp_path, make_config, rows)
    everything = {n: set(pd.read_parquet(s.path)["text"]) for n, s in full.splits.items()}
    _, sampled = _splits(tmp_path, make_config, rows, evaluation={"max_test_rows": 4})
    test = set(pd.read_parquet(sampled.splits["test"].path)["text"])
    assert len(test) == 4 and test <= everything["test"]
    assert sampled.stats["test_rows_before_sampling"] == len(everything["test"])
    assert set(pd.read_parquet(sampled.splits["train"].path)["text"]) == everything["train"]
    _, again = _splits(tmp_path, make_config, rows, evaluation={"max_test_rows": 4})
    assert set(pd.read_parquet(again.splits["test"].path)["text"]) == test
    assert again.key == sampled.key != full.key


def test_tiny_data_gets_no_empty_split_by_chance():
    for n in (3, 4, 7, 25):
        df = pd.DataFrame({"text": [f"row {i}" for i in range(n)], "label": "a"})
        for seed in range(100):
            sizes = {k: len(v) for k, v in split_frame(df, 0.15, 0.1, seed).items()}
            assert min(sizes.values()) >= 1 and sum(sizes.values()) == n, (n, seed, sizes)


# --------------------------------------------------------------- time-aware evaluation


def _files(rows, sizes: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Rows of several source files (``_source``), distinct texts across files."""
    frames = []
    for i, (name, n) in enumerate(sizes.items()):
        part = pd.DataFrame(rows(n, seed=seed + i))  # n per label: 3 n rows
        frames.append(part.assign(text=part["text"] + f" ({name})", _source=name))
    return pd.concat(frames, ignore_index=True)


def test_newest_files_tests_on_the_newest_files_and_moves_with_a_newer_one(rows):
    # natural order: export-10 is newer than export-9 (plain string order says otherwise)
    df = _files(rows, {"l/export-8.csv": 60, "l/export-9.csv": 10, "l/export-10.csv": 8})
    parts, info = split_newest_files(df, 0.2, 0.1, seed=0)
    # 234 rows: the newest file (24) is under 20%, so the one before it is test too (54)
    assert info["test_sources"] == ["l/export-10.csv", "l/export-9.csv"]
    assert set(parts["test"]["_source"]) == {"l/export-10.csv", "l/export-9.csv"}
    assert len(parts["test"]) == 54 and info["test_share"] >= 0.2  # whole files
    rest = pd.concat([parts["train"], parts["validation"]])
    assert set(rest["_source"]) == {"l/export-8.csv"} and len(rest) == 180
    assert 0.05 < len(parts["validation"]) / len(df) < 0.2  # about val_size of all rows

    newer = pd.concat([df, _files(rows, {"l/export-11.csv": 20}, seed=9)], ignore_index=True)
    moved, info = split_newest_files(newer, 0.2, 0.1, seed=0)
    assert info["test_sources"] == ["l/export-11.csv"]  # the point: test follows the data
    assert set(moved["test"]["_source"]) == {"l/export-11.csv"}
    # a row outside the test split keeps its split as files land
    before, after = _split_of(parts), _split_of(moved)
    assert all(after[t] == before[t] for t in rest["text"])

    with pytest.raises(DataError, match="at least two source files.*evaluation.split: random"):
        split_newest_files(df[df["_source"] == "l/export-8.csv"], 0.2, 0.1, seed=0)


def test_newest_files_by_a_column_orders_files_by_their_latest_value(rows):
    df = _files(rows, {"b.csv": 20, "a.csv": 5, "c.csv": 20})
    latest = {"a.csv": "2026-12-05", "b.csv": "2026-11-01", "c.csv": "2026-10-01"}
    df["published_at"] = df["_source"].map(latest)
    parts, info = split_newest_files(df, 0.2, 0.1, seed=0, column="published_at")
    # a.csv (newest by date, 15 rows) is not enough; b.csv is next, c.csv oldest: train
    assert info["test_sources"] == ["a.csv", "b.csv"]
    assert info["split_column_compared_as"] == "datetime"


def test_by_column_tests_on_the_highest_values_keeping_ties_together(rows):
    df = pd.DataFrame(rows(20))  # 60 rows
    days = [f"2026-11-{1 + i % 30:02d}" for i in range(len(df))]  # each day twice
    df = df.assign(published_at=days, _source="d.csv")
    parts, info = split_by_column(df, "published_at", 0.15, 0.1, seed=0)
    # 15% of 60 is 9 rows; the 9th highest day (2026-11-26) has a twin: 10 rows, both kept
    assert sorted(set(parts["test"]["published_at"])) == [f"2026-11-{d}" for d in range(26, 31)]
    assert len(parts["test"]) == 10 and info["test_from_value"].startswith("2026-11-26")
    assert info["split_column_compared_as"] == "datetime"
    rest = pd.concat([parts["train"], parts["validation"]])
    assert rest["published_at"].max() == "2026-11-25" and len(rest) == 50

    # numbers stored as text compare as numbers (9 < 10), not as text
    nums = df.assign(version=[str(i % 12) for i in range(len(df))])
    parts, info = split_by_column(nums, "version", 0.15, 0.1, seed=0)
    assert info["split_column_compared_as"] == "number"
    assert set(parts["test"]["version"]) == {"11", "10"}

    with pytest.raises(DataError, match=r"no column 'publish_date'.*columns: text, label"):
        split_by_column(df, "publish_date", 0.15, 0.1, seed=0)
    with pytest.raises(DataError, match="every row would be test"):
        split_by_column(df.assign(published_at="2026-11-01"), "published_at", 0.15, 0.1, 0)


def test_split_settings_validated_and_default_keys_unchanged(tmp_path, make_config, rows):
    """random (the default) adds no key term: entries made before time-aware splits are
    reused. The other splits change the key, and so does a train selection."""
    with pytest.raises(ValidationError, match="by_column needs split_column"):
        EvaluationConfig(split="by_column")
    with pytest.raises(ValidationError, match="split_column .* applies to split: by_column"):
        EvaluationConfig(split_column="published_at")
    landing = tmp_path / "landing"
    write_csv(landing / "2026-12-01.csv", rows(20))
    write_csv(landing / "2026-12-02.csv", rows(4, seed=5))
    cfg = make_config(landing)
    # the split settings as they were before evaluation.split existed
    assert _split_settings(cfg) == {"split_seed": 0, "test_size": 0.2, "val_size": 0.15}
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    key = plan(cfg, raw)[0]
    explicit = make_config(landing, evaluation={"split": "random"})
    assert plan(explicit, raw)[0] == key == plan(cfg, raw, selection=None)[0]
    newest = make_config(landing, evaluation={"split": "newest_files"})
    assert plan(newest, raw)[0] != key
    new_file = next(s.path for s in raw.sources if s.path.endswith("2026-12-02.csv"))
    selection = TrainSelection(new_sources=(new_file,), replay_share=0.5, seed=1)
    with_selection = plan(newest, raw, selection=selection)[0]
    assert with_selection != plan(newest, raw)[0]
    assert with_selection == plan(newest, raw, selection=TrainSelection([new_file], 0.5, 1))[0]
    assert with_selection != plan(newest, raw, selection=TrainSelection([new_file], 0.3, 1))[0]

    # through the stage: the newest file is test; the selection trains on new rows only
    # among this run's train rows (here none: the new file is all test)
    parts, stats = split_parts(newest, raw)
    assert set(parts["test"]["_source"]) == {new_file}
    assert stats["test_sources"] == [new_file]
    with pytest.raises(DataError, match="none of the .* train rows come from the new files"):
        split_parts(newest, raw, selection=selection)
    by_name = make_config(landing, evaluation={"split": "by_column", "split_column": "day"})
    with pytest.raises(DataError, match=r"evaluation.split_column: no column 'day'"):
        split_parts(by_name, raw)


# --------------------------------------------------------------- continual training


def test_train_selection_keeps_new_rows_and_a_replay_share(rows):
    train = _files(rows, {"old-1.csv": 30, "old-2.csv": 30, "new.csv": 10})  # 90+90+30
    selection = TrainSelection(new_sources=("new.csv",), replay_share=0.25, seed=3)
    kept, stats = select_train(train, selection)
    assert stats == {
        "train_rows_new": 30,
        "train_rows_replay": 10,  # 30 * 0.25 / 0.75: a quarter of the 40 rows kept
        "train_rows_available_earlier": 180,
    }
    assert (kept["_source"] == "new.csv").sum() == 30 and len(kept) == 40
    # rows keep their order
    order = {t: i for i, t in enumerate(train["text"])}
    assert kept["text"].map(order).is_monotonic_increasing
    # the sample is seeded: the same rows again, other rows with another seed; adding
    # earlier data changes it little
    assert select_train(train, selection)[0]["text"].tolist() == kept["text"].tolist()
    other = select_train(train, TrainSelection(("new.csv",), 0.25, seed=4))[0]
    assert set(other["text"]) != set(kept["text"])
    more = pd.concat([train, _files(rows, {"old-3.csv": 2}, seed=7)], ignore_index=True)
    grown = set(select_train(more, selection)[0]["text"])
    assert len(set(kept["text"]) - grown) <= 6

    none, stats = select_train(train, TrainSelection(("new.csv",), 0.0, seed=3))
    assert set(none["_source"]) == {"new.csv"} and stats["train_rows_replay"] == 0
    # more replay wanted than there is: every earlier row
    few = train[train["_source"] != "old-2.csv"].iloc[:100]
    _, stats = select_train(few, TrainSelection(("new.csv",), 0.9, seed=3))
    assert stats["train_rows_replay"] == stats["train_rows_available_earlier"]
    assert TrainSelection(["b", "a"], 0.5, 1).key() == {
        "new_sources": ["a", "b"],
        "replay_share": 0.5,
        "seed": 1,
    }
    with pytest.raises(DataError, match=r"none of the 180 train rows come from the new files"):
        select_train(train[train["_source"] != "new.csv"], selection)


def test_preprocess_with_newest_files_and_a_selection(tmp_path, make_config, rows):
    """One run of the whole stage: validation and test keep every row; train is the new
    file's rows plus the replay sample; the manifest records both."""
    landing = tmp_path / "landing"
    write_csv(landing / "2026-12-01.csv", rows(20))
    write_csv(landing / "2026-12-02.csv", rows(6, seed=5))
    write_csv(landing / "2026-12-03.csv", rows(8, seed=6))
    cfg = make_config(landing, evaluation={"split": "newest_files"})
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    middle = next(s.path for s in raw.sources if s.path.endswith("2026-12-02.csv"))
    selection = TrainSelection(new_sources=(middle,), replay_share=0.5, seed=0)
    full, _ = split_parts(cfg, raw)
    splits = preprocess(cfg, raw, store, selection=selection)
    frames = {n: pd.read_parquet(s.path) for n, s in splits.splits.items()}
    assert splits.stats["test_sources"] == [next(s.path for s in raw.sources if "12-03" in s.path)]
    for name in ("validation", "test"):
        assert splits.splits[name].rows == len(full[name])
    new = int((full["train"]["_source"] == middle).sum())
    assert splits.stats["train_rows_new"] == new
    assert splits.stats["train_rows_replay"] == new  # share 0.5: as many earlier as new
    assert splits.splits["train"].rows == 2 * new
    assert set(frames["train"]["_source"]) == {middle, *(s.path for s in raw.sources[:1])}


def test_by_column_through_ingest_validate_and_preprocess(tmp_path, make_config, rows):
    """evaluation.split_column survives ingest (a column no task type reads) and the
    contract, and the newest rows by it are the test split."""
    from domaintune.tasks.validate import validate

    data = rows(20)
    for i, r in enumerate(data):
        r["published_at"] = f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}"
    src = write_csv(tmp_path / "news.csv", data, columns=("text", "label", "published_at"))
    cfg = make_config(
        src,
        data={"extra_columns": "error"},
        evaluation={"split": "by_column", "split_column": "published_at"},
    )
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    assert "published_at" in raw.columns
    report = validate(cfg, raw, store)
    assert report.success
    splits = preprocess(cfg, raw, store, validation=report)
    test = pd.read_parquet(splits.splits["test"].path, columns=["text"])
    newest = min(r["published_at"] for r in data if r["text"] in set(test["text"]))
    older = [r["published_at"] for r in data if r["text"] not in set(test["text"])]
    assert newest >= max(older)
