"""Landing zones: atomic landing, complete-file detection, one announcement per content."""

from __future__ import annotations

import os
import time
from pathlib import Path

from domaintune import landing


def test_files_land_atomically_and_originals_are_untouched(tmp_path):
    src = tmp_path / "in" / "batch.csv"
    src.parent.mkdir()
    src.write_text("text,label\na,b\n")
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    root = tmp_path / "landing"
    (landed,) = landing.add_files("finance", [src], root)
    landed = Path(landed)
    assert landed == root / "finance" / "batch.csv" and landed.read_bytes() == before[0]
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before
    assert not [p for p in landed.parent.iterdir() if p.name.endswith(".part")]
    # the same name with other content keeps both; the same content is not copied twice
    src.write_text("text,label\nc,d\n")
    (other,) = landing.add_files("finance", [src], root)
    assert Path(other) != landed and Path(other).name.startswith("batch-")
    assert landed.read_text().endswith("a,b\n")
    assert landing.add_files("finance", [src], root) == [other]


def test_scan_ignores_partial_and_fresh_files_and_fires_once_per_content(tmp_path):
    d = tmp_path / "landing" / "health"
    d.mkdir(parents=True)
    done = d / "a.csv"
    done.write_text("x\n")
    old = time.time() - 60
    os.utime(done, (old, old))
    (d / "b.csv.part").write_text("partial")
    (d / ".hidden.csv").write_text("x")
    (d / "c.csv").write_text("still being written")  # mtime now: not settled
    found = landing.scan(d, settle_seconds=5)
    assert [f["path"] for f in found] == [str(done)]
    landing.mark_announced(d, found)
    assert landing.scan(d, settle_seconds=5) == []
    # a copy of announced content under another name does not fire again
    copy = d / "a-copy.csv"
    copy.write_text("x\n")
    os.utime(copy, (old, old))
    assert landing.scan(d, settle_seconds=5) == []


def test_data_add_announces_once_and_the_watcher_not_again(tmp_path, monkeypatch):
    sent = []
    monkeypatch.setattr(landing, "announce", lambda domain, files: sent.append((domain, files)))
    src = tmp_path / "new.csv"
    src.write_text("text,label\nx,y\n")
    root = tmp_path / "landing"
    infos = landing.land_and_announce("ecommerce", [src], root)
    assert len(infos) == 1 and sent == [("ecommerce", infos)]
    assert landing.land_and_announce("ecommerce", [src], root) == []
    landed = root / "ecommerce" / "new.csv"
    old = time.time() - 60
    os.utime(landed, (old, old))
    assert landing.watch_once(root, settle_seconds=0) == {}
    assert len(sent) == 1


def test_an_object_store_landing_location_works_the_same(tmp_path, monkeypatch):
    """fsspec's in-memory file system, at unit-test speed (the real S3 API is below)."""
    sent = []
    monkeypatch.setattr(landing, "announce", lambda domain, files: sent.append((domain, files)))
    src = tmp_path / "batch.csv"
    src.write_text("text,label\nx,y\n")
    root = f"memory://landing-{os.getpid()}"
    infos = landing.land_and_announce("finance", [src], root)
    assert infos[0]["path"] == f"memory:///landing-{os.getpid()}/finance/batch.csv"
    assert len(sent) == 1
    # a file put there by another tool: announced by the watcher once it has settled
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"/landing-{os.getpid()}/finance/more.csv", b"text,label\nz,w\n")
    assert landing.watch_once(root, settle_seconds=3600) == {}, "not settled yet"
    fired = landing.watch_once(root, settle_seconds=0)
    assert [f["path"].rsplit("/", 1)[-1] for f in fired["finance"]] == ["more.csv"]
    assert landing.watch_once(root, settle_seconds=0) == {}
    assert len(sent) == 2


def test_two_hosts_watching_one_s3_landing_zone_announce_each_file_once(tmp_path, s3):
    """Files land in an S3 landing zone; two watchers on two "hosts" (processes with their
    own HOME) scan it at the same moment: each file is announced by exactly one of them,
    because the ledger and the lock (a lease) live in the bucket."""
    import json
    import subprocess
    import sys

    bucket = s3.bucket("landing")
    fs = s3.fs()
    for i in range(3):
        fs.pipe_file(f"{bucket}/landing/finance/b{i}.csv", f"text,label\nx{i},y\n".encode())
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_ENDPOINT_URL_S3": s3.endpoint,
    }
    env.pop("PREFECT_API_URL", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "domaintune.cli",
                "watch",
                "--once",
                "--settle",
                "0",
                "--landing",
                f"s3://{bucket}/landing",
                "--json",
            ],
            env={**env, "HOME": str(tmp_path / f"home-{h}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for h in ("a", "b")
    ]
    announced = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        announced += [f["path"] for f in json.loads(out).get("finance", [])]
    assert sorted(a.rsplit("/", 1)[-1] for a in announced) == ["b0.csv", "b1.csv", "b2.csv"]
    ledger = json.loads(fs.cat_file(f"{bucket}/landing/finance/.domaintune-announced.json"))
    assert len(ledger["announced"]) == 3


def test_a_settled_file_is_read_once_not_on_every_pass(tmp_path, monkeypatch):
    """The watcher's cost per pass must not grow with everything ever landed: announced
    files are known from the ledger by name, size and time, other settled files (a copy of
    announced content) from this process's memory; only new or changed files are read."""
    d = tmp_path / "landing" / "retail"
    d.mkdir(parents=True)
    old = time.time() - 60
    for i in range(5):
        (d / f"batch-{i}.csv").write_text(f"text,label\nrow {i},a\n")
        os.utime(d / f"batch-{i}.csv", (old, old))
    (d / "copy-of-0.csv").write_text("text,label\nrow 0,a\n")
    os.utime(d / "copy-of-0.csv", (old, old))
    read = []
    real = landing._sha256_fs
    monkeypatch.setattr(landing, "_sha256_fs", lambda fs, p: read.append(p) or real(fs, p))
    found = landing.scan(d, settle_seconds=5)
    assert len(found) == 5 and len(read) == 6
    landing.mark_announced(d, found)
    read.clear()
    for _ in range(3):
        assert landing.scan(d, settle_seconds=5) == []
    assert read == [], "nothing new, nothing read"
    # a watcher started afresh (no memory) reads only what the ledger does not know
    landing._DIGESTS.clear()
    assert landing.scan(d, settle_seconds=5) == [] and read == [str(d / "copy-of-0.csv")]
    # a file changed in place is read (and announced) again
    (d / "batch-3.csv").write_text("text,label\nrow 3 corrected,a\n")
    os.utime(d / "batch-3.csv", (old + 1, old + 1))
    again = landing.scan(d, settle_seconds=5)
    assert [f["path"] for f in again] == [str(d / "batch-3.csv")]
