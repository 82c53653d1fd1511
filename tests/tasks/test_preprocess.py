import pandas as pd

from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess, split_frame
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
