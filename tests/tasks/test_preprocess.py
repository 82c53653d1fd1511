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


def test_split_is_stratified_deterministic_and_order_independent(rows):
    df = pd.DataFrame(rows(40))
    a = split_frame(df, "label", 0.2, 0.1, seed=3)
    b = split_frame(df.sample(frac=1, random_state=1), "label", 0.2, 0.1, seed=3)
    for name in a:
        assert a[name]["text"].tolist() == b[name]["text"].tolist()
    assert a["test"]["label"].value_counts().to_dict() == {
        "negative": 8,
        "neutral": 8,
        "positive": 8,
    }
    assert a["validation"]["label"].value_counts().to_dict() == {
        "negative": 4,
        "neutral": 4,
        "positive": 4,
    }
    assert set(a["train"]["text"]).isdisjoint(a["test"]["text"])
    c = split_frame(df, "label", 0.2, 0.1, seed=4)
    assert c["test"]["text"].tolist() != a["test"]["text"].tolist()


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
