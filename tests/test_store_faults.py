"""The store on a real S3 API server (moto) behind a proxy that injects faults (``tests/faultproxy.py``):
answers ``503 SlowDown`` and ``500 InternalError``, slow and stalled answers, connections cut
mid-upload, answers lost after the server wrote, a store that refuses every connection; and
two hosts whose clocks differ by minutes.

What must hold: transient faults are retried (botocore's standard retry mode, set by
``storage.remote``) and the write completes; faults that outlast the retries fail in one
line naming the store and the operation, and leave nothing that a reader takes as complete;
a registration is committed once or not at all; a lease holder cut off from the store gives
its lease up before another host can take it over; compute-once, leases and the registry's
order never depend on a host's clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from domaintune.errors import StoreError
from domaintune.registry import MARKER as REGISTRATION
from domaintune.registry import Registry
from domaintune.storage.coordination import Lease, LeaseLost
from domaintune.storage.remote import S3_RETRIES, with_retry_defaults
from domaintune.storage.store import MARKER, Store
from tests.faultproxy import RetryCounter, fault_proxy

ROOT = Path(__file__).resolve().parent.parent


#: fewer attempts than the default, where a test waits for the retries to run out
QUICK = {"retries": {"mode": "standard", "total_max_attempts": 3}}


class Entry(BaseModel):
    path: str
    reused: bool = False


@pytest.fixture(scope="module")
def proxy(s3):
    with fault_proxy(s3.endpoint) as p:
        yield p


@pytest.fixture
def faults(proxy, monkeypatch, tmp_path):
    """The proxy, passing everything, its counters at zero; this host's cache in tmp_path."""
    monkeypatch.setenv("DOMAINTUNE_CACHE", str(tmp_path / "cache"))
    proxy.passing()
    proxy.counts.clear()
    yield proxy
    proxy.passing()


def _options(s3, endpoint: str, **extra) -> dict:
    return {
        "endpoint_url": endpoint,
        "key": s3.key,
        "secret": s3.secret,
        "skip_instance_cache": True,
        **extra,
    }


def _stores(s3, faults, **extra) -> tuple[Store, Store, object]:
    """A store seen through the proxy (the writer), the same store seen directly (a reader
    on another host), and the reader's file system."""
    root = f"s3://{s3.bucket('faults')}/store"
    return (
        Store(root, _options(s3, faults.endpoint, **extra)),
        Store(root, _options(s3, s3.endpoint)),
        s3.fs(),
    )


def _write(store: Store, stage: str, key: str, files: dict[str, bytes]) -> Entry:
    with store.writer(stage, key) as w:
        for rel, data in files.items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.path / rel).write_bytes(data)
        w.manifest = {"path": str(store.entry_path(stage, key))}
    return Entry(path=str(store.entry_path(stage, key)))


def _files(tag: str, n: int = 3, size: int = 40_000) -> dict[str, bytes]:
    out = {f"part-{i}.bin": (f"{tag}-{i}-".encode() * size)[:size] for i in range(n)}
    out["nested/meta.json"] = json.dumps({"tag": tag}).encode()
    return out


def entry_state(fs, remote: str, expected: dict[str, bytes] | None = None) -> str:
    """What a reader on another host sees of an entry: absent, complete, or partial (a
    marker whose files are missing, resized, or not the bytes that were written)."""
    try:
        marker = json.loads(fs.cat_file(f"{remote}/{MARKER}"))
    except FileNotFoundError:
        return "absent"
    found = fs.find(remote, detail=True, withdirs=False)
    for rel, size in marker["files"].items():
        if found.get(f"{remote}/{rel}", {}).get("size") != size:
            return "partial"
    for rel, data in (expected or {}).items():
        if rel not in marker["files"] or fs.cat_file(f"{remote}/{rel}") != data:
            return "partial"
    return "complete"


class Reader(threading.Thread):
    """Reads an entry through a direct connection, again and again, while it is written."""

    def __init__(self, fs, remote: str, expected: dict[str, bytes]):
        super().__init__(daemon=True)
        self.fs, self.remote, self.expected = fs, remote, expected
        self.seen: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            state = entry_state(self.fs, self.remote, self.expected)
            self.seen[state] = self.seen.get(state, 0) + 1
            time.sleep(0.05)

    def __enter__(self) -> Reader:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join(timeout=30)


# --------------------------------------------------------------------------- retry policy


def test_the_retry_policy_is_a_default_a_user_setting_wins():
    assert with_retry_defaults("s3://b/x", {})["config_kwargs"] == {"retries": S3_RETRIES}
    mine = {"config_kwargs": {"read_timeout": 1, "retries": {"mode": "adaptive"}}}
    assert with_retry_defaults("s3://b/x", mine)["config_kwargs"] == mine["config_kwargs"]
    timeout = with_retry_defaults("s3://b/x", {"config_kwargs": {"read_timeout": 1}})
    assert timeout["config_kwargs"] == {"read_timeout": 1, "retries": S3_RETRIES}
    assert with_retry_defaults("gs://b/x", {"a": 1}) == {"a": 1}
    assert with_retry_defaults("/local/path", {}) == {}


# --------------------------------------------------------------------------- (a) entries


def test_entries_are_written_through_503s_cuts_lost_answers_and_slow_answers(s3, faults):
    """Every fault is retried and the entry completes; a reader on another host, reading
    all along, never sees a marker whose files are not all there, whole."""
    writer, _, fs = _stores(s3, faults)
    files = _files("a")
    remote = f"{writer._remote_root}/prep/k1"
    faults.slow(0.005)
    faults.fail_next(2, 503)
    faults.drop_next(2, after_bytes=9_000)  # both cut mid-body
    faults.lose_answers(2)
    faults.fail_next(2, 500)
    with RetryCounter() as retries, Reader(fs, remote, files) as reader:
        out = writer.compute_once("prep", "k1", Entry, lambda: _write(writer, "prep", "k1", files))
    assert not out.reused and faults.pending() == 0, faults.counts
    assert entry_state(fs, remote, files) == "complete"
    assert reader.seen.get("partial", 0) == 0 and reader.seen.get("absent", 0) > 0, reader.seen
    assert retries.total >= 4, (retries.botocore, retries.s3fs)

    # the marker's own answer lost: its create-if-absent is retried, refused by the marker
    # it wrote itself, and recognised as this writer's (not "someone else completed it")
    faults.passing()
    faults.match = lambda method, path: method == "PUT" and path.split("?")[0].endswith(MARKER)
    faults.lose_answers(1)
    _write(writer, "prep", "k2", files)
    assert faults.counts["answer lost"] == 3
    assert entry_state(fs, f"{writer._remote_root}/prep/k2", files) == "complete"

    # an answer slower than the client's read timeout: the request is sent again
    faults.passing()
    slow_reader, _, fs2 = _stores(s3, faults, config_kwargs={"read_timeout": 1})
    faults.match = lambda method, path: method == "PUT"
    faults.stall_next(1, 1.6)
    _write(slow_reader, "prep", "k3", files)
    assert faults.counts["stalled"] == 1
    assert entry_state(fs2, f"{slow_reader._remote_root}/prep/k3", files) == "complete"


def test_faults_that_outlast_the_retries_fail_in_one_line_and_leave_no_marker(s3, faults):
    writer, direct, fs = _stores(s3, faults)
    files = {"only.bin": b"b" * 50_000}  # one upload: one request's attempts counted
    remote = f"{writer._remote_root}/prep/k1"
    # every attempt at the entry's files fails (the lock's own objects pass)
    faults.match = lambda method, path: method == "PUT" and "/store/prep/k1/" in path
    faults.fail_next(50, 500)
    t0 = time.monotonic()
    with Reader(fs, remote, files) as reader, pytest.raises(StoreError) as failed:
        writer.compute_once("prep", "k1", Entry, lambda: _write(writer, "prep", "k1", files))
    msg = str(failed.value)
    assert "\n" not in msg and msg.startswith(f"store {writer.url}: writing prep/k1: "), msg
    assert "internal error" in msg, msg
    attempts = faults.counts["answered 500"]
    assert attempts == S3_RETRIES["total_max_attempts"], faults.counts  # botocore, 1 layer
    assert time.monotonic() - t0 < 40
    assert entry_state(fs, remote) == "absent" and reader.seen.get("partial", 0) == 0
    assert not direct.is_complete("prep", "k1")

    # the store is back: the next attempt computes and completes the entry
    faults.passing()
    out = writer.compute_once("prep", "k1", Entry, lambda: _write(writer, "prep", "k1", files))
    assert not out.reused and entry_state(fs, remote, files) == "complete"
    assert direct.compute_once("prep", "k1", Entry, lambda: pytest.fail("recomputed")).reused

    # a store that refuses every connection: one line that says so (fewer attempts than the
    # default, to keep the test short)
    writer = Store(writer.url, _options(s3, faults.endpoint, config_kwargs=QUICK))
    faults.refuse()
    with pytest.raises(StoreError) as away:
        writer.compute_once("prep", "k9", Entry, lambda: pytest.fail("computed"))
    msg = str(away.value)
    assert "\n" not in msg and "cannot reach the object store" in msg, msg
    assert "lock prep/k9" in msg, msg


def test_a_damaged_remote_entry_is_recomputed_not_used(s3, faults):
    writer, direct, fs = _stores(s3, faults)
    files = _files("c")
    _write(writer, "prep", "k1", files)
    remote = f"{writer._remote_root}/prep/k1"
    fs.rm_file(f"{remote}/part-1.bin")  # lost from the store by other means
    assert direct.read_marker("prep", "k1") is None
    out = direct.compute_once("prep", "k1", Entry, lambda: _write(direct, "prep", "k1", files))
    assert not out.reused and entry_state(fs, remote, files) == "complete"


def test_checkpoints_are_stored_through_faults_and_restored_whole(s3, faults, tmp_path):
    """Training checkpoints go through the store's file system (and so the same retries),
    their marker last: a host restoring them gets whole checkpoints only."""
    from domaintune.training.checkpoints import CHECKPOINT_MARKER, CheckpointMirror

    writer, direct, fs = _stores(s3, faults)
    work = tmp_path / "work-a"
    files = {}
    for step in (2, 4):
        ckpt = work / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        for name, data in _files(f"ckpt{step}", n=2).items():
            files[f"checkpoint-{step}/{name}"] = data
            (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
            (ckpt / name).write_bytes(data)
        (ckpt / CHECKPOINT_MARKER).write_text(json.dumps({"step": step}))
    faults.match = lambda method, path: method == "PUT"
    faults.fail_next(2, 503)
    faults.drop_next(2, after_bytes=5_000)
    faults.lose_answers(2)
    CheckpointMirror(writer, "key1", work).sync_once()
    assert faults.pending() == 0, faults.counts

    restored = tmp_path / "work-b"
    got = CheckpointMirror(direct, "key1", restored).restore()
    assert got == ["checkpoint-2", "checkpoint-4"]
    for rel, data in files.items():
        assert (restored / "checkpoints" / rel).read_bytes() == data, rel


# --------------------------------------------------------------------------- (b) registry


def register_version(registry: Registry, tag: str, size: int = 30_000) -> str:
    """What ``tasks/register.py`` does with a registry, with a made-up model: under the
    registry's lock, claim a version, publish its folder (registration.json last), commit
    the register event; on any failure, discard the version."""
    with registry.lock():
        state = registry.state()
        version = registry.next_version(state)
        try:
            staged = registry.staging_dir(version)
            (staged / "model").mkdir()
            (staged / "model" / "weights.bin").write_bytes((tag.encode() * size)[:size])
            registration = {"version": version, "tag": tag, "key": tag}
            (staged / REGISTRATION).write_text(json.dumps(registration))
            registry.publish(version, staged, {})
            registry.append(state, action="register", version=version, registration=registration)
        except BaseException:
            registry.discard(version)
            raise
    return version


def registry_problems(fs, path: str) -> list[str]:
    """What is wrong with a registry as a reader on another host sees it: a version that the
    log names without its whole folder, versions not numbered 1, 2, 3 ... in log order, a
    log with a gap, two events for one version."""
    problems = []
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{path}/log", detail=False))
    if names != [f"{i:06d}.json" for i in range(1, len(names) + 1)]:
        problems.append(f"log not numbered 1..n: {names}")
    events = [json.loads(fs.cat_file(f"{path}/log/{n}")) for n in names]
    versions = [e["version"] for e in events if e["action"] == "register"]
    if versions != [f"v{i:04d}" for i in range(1, len(versions) + 1)]:
        problems.append(f"versions not in order without gaps or duplicates: {versions}")
    for e in events:
        v, tag = e["version"], e["registration"]["tag"]
        try:
            reg = json.loads(fs.cat_file(f"{path}/{v}/{REGISTRATION}"))
            weights = fs.cat_file(f"{path}/{v}/model/weights.bin")
        except FileNotFoundError as exc:
            problems.append(f"{v} registered but half there: {exc}")
            continue
        if reg["tag"] != tag or weights != (tag.encode() * 30_000)[:30_000]:
            problems.append(f"{v}: its folder is not what was registered")
    return problems


def test_a_registration_under_faults_is_committed_once_or_not_at_all(s3, faults):
    writer, direct, fs = _stores(s3, faults, config_kwargs=QUICK)  # short outlasting faults
    registry, path = Registry(writer, "uc"), f"{writer._remote_root}/registry/uc"

    # 503s, cuts mid-upload and lost answers anywhere in a registration: it completes
    faults.fail_next(3, 503)
    faults.drop_next(2, after_bytes=8_000)
    faults.lose_answers(3)
    assert register_version(registry, "one") == "v0001"
    assert faults.pending() == 0 and registry_problems(fs, path) == []

    # the claim's answer lost: the claim is recognised as this writer's (no gap: v0002)
    faults.match = lambda method, path: method == "PUT" and "/claims/" in path
    faults.lose_answers(1)
    assert register_version(registry, "two") == "v0002"
    # the register event's answer lost: recognised as this writer's, committed once
    faults.match = lambda method, path: method == "PUT" and "/log/" in path
    faults.lose_answers(1)
    assert register_version(registry, "three") == "v0003"
    assert faults.counts["answer lost"] == 5 and registry_problems(fs, path) == []

    # the event cannot be written at all: not registered, its folder and claim removed
    faults.fail_next(20, 500)
    with pytest.raises(StoreError) as failed:
        register_version(registry, "four")
    msg = str(failed.value)
    assert "\n" not in msg and msg.startswith(f"registry {registry.url}: writing the log"), msg
    faults.passing()
    assert list(Registry(direct, "uc").state().versions) == ["v0001", "v0002", "v0003"]
    assert not fs.exists(f"{path}/v0004") and not fs.exists(f"{path}/claims/v0004.json")

    # the event was written but every answer was lost or an error: the run fails, yet the
    # version is committed, so it is kept whole (never a log naming a removed folder)
    faults.match = lambda method, path: method == "PUT" and "/log/" in path
    faults.lose_answers(1)
    faults.fail_next(20, 500)
    with pytest.raises(StoreError):
        register_version(registry, "four")
    faults.passing()
    state = Registry(direct, "uc").state()
    assert list(state.versions) == ["v0001", "v0002", "v0003", "v0004"]
    assert registry_problems(fs, path) == []
    assert register_version(registry, "five") == "v0005" and registry_problems(fs, path) == []


# --------------------------------------------------------------------------- (c) leases


def test_a_holder_cut_off_from_the_store_gives_its_lease_up_before_a_waiter_takes_it(s3, faults):
    import s3fs

    ttl = 3.0
    # the holder reaches the store through the proxy, the waiter directly
    holder_fs = s3fs.S3FileSystem(
        **_options(s3, faults.endpoint), use_listings_cache=False, config_kwargs=QUICK
    )
    folder = f"{s3.bucket('lease')}/locks/cut"
    holder = Lease(holder_fs, folder, "holder", ttl=ttl)
    holder.acquire()
    time.sleep(ttl / 2)
    holder.check()  # beating: held
    first = holder._path(holder.generation)

    lost_at: list[float] = []

    def watch() -> None:
        while not lost_at:
            try:
                holder.check()
            except LeaseLost:
                lost_at.append(time.monotonic())
            time.sleep(0.01)

    cut = time.monotonic()
    faults.refuse()
    threading.Thread(target=watch, daemon=True).start()
    waiter = Lease(s3.fs(), folder, "waiter", ttl=ttl)
    waiter.acquire(timeout=10 * ttl)
    taken = time.monotonic()
    assert lost_at, "the holder never noticed"
    assert lost_at[0] - cut <= ttl / 2 + 0.3, lost_at[0] - cut
    assert lost_at[0] < taken and taken - cut >= 0.9 * ttl, (lost_at[0] - cut, taken - cut)
    with pytest.raises(LeaseLost, match="could not be renewed"):
        holder.check()

    # the store answers again: the holder writes nothing more (its old object, which the
    # new holder removed, is not written again) and never releases what it lost
    faults.passing()
    holder._thread.join(timeout=30)  # a read still in its retries ends; nothing is written
    assert not holder._thread.is_alive()
    assert not s3.fs().exists(first)
    holder.release()
    assert json.loads(s3.fs().cat_file(waiter._path(waiter.generation)))["holder"] == (
        waiter.holder
    )
    waiter.release()


# --------------------------------------------------------------------------- (d) clocks

SITECUSTOMIZE = '''
"""Test only: this process's wall clock is FAKE_CLOCK_OFFSET seconds off."""
import os
import time

_offset = float(os.environ.get("FAKE_CLOCK_OFFSET") or 0)
if _offset:
    _time, _time_ns = time.time, time.time_ns
    _localtime, _gmtime, _strftime = time.localtime, time.gmtime, time.strftime
    time.time = lambda: _time() + _offset
    time.time_ns = lambda: _time_ns() + int(_offset * 1e9)
    time.localtime = lambda secs=None: _localtime(time.time() if secs is None else secs)
    time.gmtime = lambda secs=None: _gmtime(time.time() if secs is None else secs)
    time.strftime = lambda fmt, t=None: _strftime(fmt, time.localtime() if t is None else t)
'''

HOST = textwrap.dedent(
    """
    import json, os, sys, time
    from domaintune.registry import Registry
    from domaintune.storage.coordination import Lease
    from domaintune.storage.store import Store
    from tests.test_store_faults import Entry, _write, register_version

    role, root = sys.argv[1], sys.argv[2]
    options = {"endpoint_url": os.environ["DT_ENDPOINT"], "key": os.environ["DT_S3_KEY"],
               "secret": os.environ["DT_S3_SECRET"]}
    store = Store(root, options) if root.startswith("s3://") else None
    out = {"role": role, "skew": time.time() - float(os.environ["REAL_NOW"])}
    if role == "compute":
        def compute():
            store.fs.pipe_file(f"{store._remote_root}/computed/{os.getpid()}", b"1")
            time.sleep(1.0)
            return _write(store, "skewed", "k1", {"a.bin": b"x" * 1000})
        out["reused"] = store.compute_once("skewed", "k1", Entry, compute).reused
        out["versions"] = [register_version(Registry(store, "uc"), f"{os.getpid()}-{i}")
                           for i in range(3)]
    elif role == "hold":
        lease = Lease(store.fs, sys.argv[3], "skewed holder", ttl=float(sys.argv[4]))
        lease.acquire()
        print(json.dumps(out), flush=True)
        time.sleep(3600)
    elif role == "scan":  # a file lands (by any tool); this host scans at once, then later
        from domaintune import landing
        fs, domain = landing._fs(sys.argv[3])
        fs.pipe_file(f"{domain}/fresh.csv", b"text,label")
        first = [f["path"] for f in landing.scan(sys.argv[3], settle_seconds=2)]
        time.sleep(3.5)
        out["scans"] = [first, [f["path"] for f in landing.scan(sys.argv[3], settle_seconds=2)]]
    print(json.dumps(out), flush=True)
    """
)


def _host(
    s3, tmp_path: Path, offset: float, *args: str, env: dict | None = None
) -> subprocess.Popen:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        "FAKE_CLOCK_OFFSET": str(offset),
        "REAL_NOW": str(time.time()),
        "DT_ENDPOINT": s3.endpoint,
        "DOMAINTUNE_CACHE": str(tmp_path / f"cache{offset:+.0f}"),
        "DOMAINTUNE_LEASE_TTL": "3",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-c", HOST, *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_hosts_whose_clocks_differ_by_minutes_compute_once_lease_and_register_in_order(
    s3, tmp_path
):
    skew = 300.0  # one host 5 minutes ahead, the other 5 minutes behind
    root = f"s3://{s3.bucket('skew')}/store"
    fs = s3.fs()
    hosts = [_host(s3, tmp_path, off, "compute", root) for off in (skew, -skew)]
    results = [_result(p) for p in hosts]
    assert [round(r["skew"] / 60) for r in results] == [5, -5], "the clocks were not faked"
    assert sorted(r["reused"] for r in results) == [False, True], results
    assert len(fs.ls(f"{root[5:]}/computed")) == 1, "computed exactly once"
    versions = sorted(v for r in results for v in r["versions"])
    assert versions == [f"v{i:04d}" for i in range(1, 7)], versions
    assert registry_problems(fs, f"{root[5:]}/registry/uc") == []

    # a holder whose clock runs 5 minutes ahead dies: taken over after ~ttl of the waiter's
    # own clock, neither at once nor 5 minutes late
    ttl = 2.0
    folder = f"{root[5:]}/locks/skewed"
    holder = _host(s3, tmp_path, skew, "hold", root, folder, str(ttl))
    try:
        assert json.loads(holder.stdout.readline())["role"] == "hold"
        waiter = Lease(fs, folder, "waiter", ttl=ttl)
        with pytest.raises(TimeoutError):  # alive and beating: not taken
            waiter.acquire(timeout=1.5 * ttl)
        holder.kill()
        holder.wait()
        t0 = time.monotonic()
        waiter.acquire(timeout=10 * ttl)
        assert 0.9 * ttl <= time.monotonic() - t0 < 3 * ttl
        waiter.release()
    finally:
        holder.kill()
        holder.communicate()


def test_a_landing_scan_judges_settling_on_the_stores_clock_not_the_hosts(s3, tmp_path):
    """A file that just landed in an S3 landing zone: a host 5 minutes ahead does not take
    it for settled at once, a host 5 minutes behind does not wait 5 minutes."""
    bucket = s3.bucket("landing")
    env = {
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_ENDPOINT_URL_S3": s3.endpoint,
    }
    domains = {off: f"s3://{bucket}/landing/news{off:+.0f}" for off in (300, -300)}
    hosts = {off: _host(s3, tmp_path, off, "scan", "-", d, env=env) for off, d in domains.items()}
    for off, proc in hosts.items():
        scans = _result(proc)["scans"]
        assert scans == [[], [f"{domains[off]}/fresh.csv"]], (off, scans)
