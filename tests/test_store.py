import json

import pytest

from domaintune.storage.store import MARKER, Store


def test_entry_becomes_visible_only_when_complete(tmp_path):
    store = Store(tmp_path)
    with store.writer("stage", "k1") as w:
        (w.path / "data.txt").write_text("hello")
        w.manifest = {"rows": 1}
        assert not store.is_complete("stage", "k1")
    assert store.manifest("stage", "k1") == {"rows": 1}
    marker = json.loads((tmp_path / "stage" / "k1" / MARKER).read_text())
    assert marker["files"] == {"data.txt": 5}


def test_a_crash_while_writing_leaves_nothing_that_looks_complete(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writer("stage", "k2") as w:
            (w.path / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert not store.is_complete("stage", "k2")
    assert not (tmp_path / "stage" / "k2").exists()
    assert not list((tmp_path / "stage").glob(".tmp-*"))


def test_damaged_or_unmarked_entries_are_not_complete(tmp_path):
    store = Store(tmp_path)
    with store.writer("stage", "k3") as w:
        (w.path / "data.txt").write_text("hello")
    (tmp_path / "stage" / "k3" / "data.txt").write_text("hel")  # truncated afterwards
    assert not store.is_complete("stage", "k3")
    (tmp_path / "stage" / "k4").mkdir()  # renamed into place, died before the marker
    (tmp_path / "stage" / "k4" / "data.txt").write_text("x")
    assert not store.is_complete("stage", "k4")
    with store.writer("stage", "k4") as w:  # recomputing replaces it cleanly
        (w.path / "data.txt").write_text("fresh")
    assert store.is_complete("stage", "k4")


def test_unwritable_store_gives_a_clear_error(tmp_path):
    from domaintune.errors import StoreError

    not_a_folder = tmp_path / "store-is-a-file"
    not_a_folder.write_text("")
    with pytest.raises(StoreError, match="cannot write"):
        with Store(not_a_folder).writer("stage", "k"):
            pass


def test_fsspec_store_and_source_round_trip_through_another_machines_cache(
    tmp_path, monkeypatch, make_config, rows
):
    """A memory:// store stands in for an object store; a second cache dir for a second machine."""
    import fsspec

    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.preprocess import preprocess
    from domaintune.tasks.validate import validate
    from tests.conftest import write_csv

    mem = fsspec.filesystem("memory")
    local_csv = write_csv(tmp_path / "d.csv", rows(12))
    mem.pipe("/landing/finance/d.csv", local_csv.read_bytes())
    monkeypatch.setenv("DOMAINTUNE_CACHE", str(tmp_path / "machine-a"))
    cfg = make_config("memory:///landing/finance/*.csv", store={"root": "memory://bucket/store"})
    store_a = Store(cfg.store.root)
    raw = ingest(cfg, store_a)
    assert raw.rows == 36 and raw.sources[0].path == "memory:///landing/finance/d.csv"
    validate(cfg, raw, store_a)
    splits = preprocess(cfg, raw, store_a)
    assert mem.exists(f"/bucket/store/preprocess/{splits.key}/{MARKER}")

    monkeypatch.setenv("DOMAINTUNE_CACHE", str(tmp_path / "machine-b"))
    store_b = Store(cfg.store.root)
    raw_b = ingest(cfg, store_b)
    splits_b = preprocess(cfg, raw_b, store_b)
    assert raw_b.reused and splits_b.reused and splits_b.key == splits.key
    assert splits_b.splits["train"].path.startswith(str(tmp_path / "machine-b"))
    import pandas as pd

    assert len(pd.read_parquet(splits_b.splits["train"].path)) == splits.splits["train"].rows
