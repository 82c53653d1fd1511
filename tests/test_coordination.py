"""Locks between hosts: leases in the object store (a real S3 API server), with holders in
separate processes that wait, die and are taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import fsspec
import pytest

from domaintune.storage.coordination import Lease, LeaseLost, create_exclusive, lease


def _s3fs(s3):
    return s3.fs()


def test_create_exclusive_is_create_if_absent_on_s3(s3):
    fs = _s3fs(s3)
    bucket = s3.bucket()
    create_exclusive(fs, f"{bucket}/x.json", b"1")
    with pytest.raises(FileExistsError):
        create_exclusive(fs, f"{bucket}/x.json", b"2")
    assert fs.cat_file(f"{bucket}/x.json") == b"1"


def test_two_holders_never_overlap_and_a_released_lease_is_taken_at_once(s3):
    fs = _s3fs(s3)
    folder = f"{s3.bucket()}/locks/a"
    inside: list[str] = []
    overlaps: list[str] = []

    def hold(name: str) -> None:
        for _ in range(3):
            with lease(fs, folder, f"test {name}"):
                if inside:
                    overlaps.append(f"{name} while {inside}")
                inside.append(name)
                time.sleep(0.2)
                inside.remove(name)

    threads = [threading.Thread(target=hold, args=(n,)) for n in ("a", "b", "c")]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not overlaps
    assert time.monotonic() - t0 < 60, "released leases are taken without waiting for the TTL"
    # one object per lock is left (the newest generation, released)
    left = fs.ls(folder, detail=False)
    assert len(left) == 1 and json.loads(fs.cat_file(left[0]))["released"] is True


_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from domaintune.storage.coordination import Lease
    from tests.services import S3Server
    import s3fs
    fs = s3fs.S3FileSystem(key=os.environ["DT_S3_KEY"], secret=os.environ["DT_S3_SECRET"],
                           endpoint_url=sys.argv[1], use_listings_cache=False)
    lease = Lease(fs, sys.argv[2], "holder process", ttl=float(sys.argv[3]))
    lease.acquire()
    print("held", flush=True)
    time.sleep(3600)
    """
)


def test_a_holder_that_dies_is_taken_over_after_its_ttl_and_a_frozen_one_loses(s3, tmp_path):
    """A holder in another process is SIGKILLed: a waiter takes the lease over once the
    lease has been silent for its TTL (judged by the waiter's own clock), not before."""
    fs = _s3fs(s3)
    folder = f"{s3.bucket()}/locks/b"
    ttl = 3.0
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, s3.endpoint, folder, str(ttl)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        waiter = Lease(fs, folder, "waiter", ttl=ttl)
        with pytest.raises(TimeoutError):  # alive and beating: not taken
            waiter.acquire(timeout=2 * ttl)
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        waiter.acquire(timeout=10 * ttl)
        waited = time.monotonic() - t0
        assert ttl * 0.9 <= waited < 4 * ttl, waited
    finally:
        proc.kill()

    # a holder that stops beating (frozen) past its TTL loses the lease and knows it
    frozen = Lease(fs, f"{folder}-frozen", "frozen holder", ttl=ttl)
    frozen.acquire()
    frozen._stop.set()  # its heartbeat stops, as if the process were frozen
    other = Lease(fs, f"{folder}-frozen", "other", ttl=ttl)
    other.acquire(timeout=10 * ttl)
    frozen._stop.clear()
    frozen._heartbeat_once()
    with pytest.raises(LeaseLost):
        frozen.check()
    other.release()
    waiter.release()


def test_memory_fs_leases_work_for_unit_tests():
    fs = fsspec.filesystem("memory")
    with lease(fs, "/locks-unit/x", "unit") as held:
        held.check()
        with pytest.raises(TimeoutError):
            Lease(fs, "/locks-unit/x", "second", ttl=30).acquire(timeout=0.5)
    with lease(fs, "/locks-unit/x", "again", timeout=1):
        pass
