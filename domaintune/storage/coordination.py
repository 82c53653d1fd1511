"""Coordination across hosts: locks that live in the store's own file system.

One mechanism per kind of store, behind one ``lock(...)`` context manager:

- **A local folder** (``store.root: ./.domaintune``, NFS): a file lock (``filelock``), as
  always. The kernel releases it when its holder dies, so a killed run never blocks others.
- **An object store** (``s3://...``; ``memory://`` in unit tests): a **lease** made of small
  objects ``<folder>/<generation>.json`` written with *create-if-absent* (S3
  ``If-None-Match: *``, fsspec's ``pipe_file(mode="create")``): of several hosts trying to
  create the same generation, exactly one succeeds. The holder of the newest generation
  holds the lease while it is *live*:

  * a heartbeat thread rewrites the holder's own object every ``ttl / 6`` seconds (a beat
    counter), and checks that no newer generation appeared (else the lease was lost: the
    holder was silent for too long, and ``check()`` raises from then on);
  * a waiter declares the holder dead when the object has not changed for ``ttl`` seconds
    *of the waiter's own clock*: no two hosts need to agree on the time;
  * a holder that cannot renew (cut off from the store, or the store too slow) gives the
    lease up itself once ``ttl / 2`` seconds *of its own clock* have passed since the start of
    its last successful beat: ``check()`` raises and it writes no more beats, strictly before
    a waiter, which needs ``ttl`` seconds without a change, can take over;
  * to take over, a waiter creates the next generation; if another waiter created it first,
    the create fails and it goes on waiting. A released lease is taken the same way at once.

A holder that dies therefore blocks others for at most ``ttl`` seconds (``DOMAINTUNE_LEASE_TTL``,
default 60) and two holders never both believe they hold a live lease for longer than a
holder can be frozen without noticing. Writes that must never interleave (the registry's
event log) are additionally fenced by create-if-absent of their own, so even a holder frozen
past its lease cannot commit over another's work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from domaintune.errors import StoreError, store_error
from domaintune.storage.remote import describe_remote_error

log = logging.getLogger(__name__)

#: protocols whose ``pipe_file(mode="create")`` is atomic on the server (tested here: s3 against
#: a real S3 API server; memory within one process, for unit tests)
ATOMIC_CREATE = {"s3", "s3a", "memory"}


def lease_ttl() -> float:
    """Seconds of silence after which a lease holder is taken for dead."""
    return float(os.environ.get("DOMAINTUNE_LEASE_TTL", "60"))


class LeaseLost(StoreError):
    """Another host took over a lease this process held (it was silent for too long)."""


def protocol_of(fs: Any) -> str:
    p = fs.protocol
    return p[0] if isinstance(p, tuple | list) else p


def create_exclusive(fs: Any, path: str, data: bytes) -> None:
    """Write ``path`` only if it does not exist yet (FileExistsError otherwise), atomically
    where the file system can (see ``ATOMIC_CREATE``; local folders use O_EXCL).

    A request whose object was written but whose answer was lost (a connection cut after
    the server wrote) is retried by the client and then refused by the object it wrote
    itself: an object holding exactly ``data`` is taken as this call's own, so ``data``
    must be unique to its writer (a holder's id, a token) wherever that matters."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:
            f.write(data)
        return
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        try:
            if fs.cat_file(path) == data:
                log.info("%s: created by this writer (its first answer was lost)", path)
                return
        except FileNotFoundError:
            pass
        raise


def write_by(fs: Any, path: str, data: bytes, deadline: float) -> None:
    """Write ``path``, giving up at ``deadline`` (``time.monotonic()``): the client's
    retries of an asynchronous file system (s3fs) are cancelled then, so that nothing sent
    later lands after it; others write as usual."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"{path}: not written before its deadline")
    if getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
        from fsspec.asyn import sync

        sync(fs.loop, fs._pipe_file, path, data, timeout=remaining)
    else:
        fs.pipe_file(path, data)


def numbered_objects(fs: Any, folder: str) -> list[int]:
    """The numbers N of the ``<N>.json`` objects in ``folder``, ascending, as the store has
    them now (never from a listing cached earlier: other hosts write there)."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(folder)
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        stem = n.rstrip("/").rsplit("/", 1)[-1]
        if stem.endswith(".json") and stem[:-5].isdigit():
            out.append(int(stem[:-5]))
    return sorted(out)


class Lease:
    """A lease in an object store folder (see the module's docstring)."""

    def __init__(self, fs: Any, folder: str, what: str, ttl: float | None = None):
        self.fs = fs
        self.folder = folder.rstrip("/")
        self.what = what
        self.ttl = ttl if ttl is not None else lease_ttl()
        self.poll = max(0.2, min(2.0, self.ttl / 10))
        self.holder = uuid.uuid4().hex
        self.generation: int | None = None
        self.lost = False
        self.cut_off = False  # lost because it could not renew (not taken over)
        #: monotonic start of the last write of this holder's object that succeeded
        self._renewed = 0.0
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    # ------------------------------------------------------------------ objects
    def _path(self, generation: int) -> str:
        return f"{self.folder}/{generation:012d}.json"

    def _generations(self) -> list[int]:
        return numbered_objects(self.fs, self.folder)

    def _read(self, generation: int) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(generation))
        except FileNotFoundError:
            return None

    def _body(self, released: bool = False) -> bytes:
        return json.dumps(
            {
                "holder": self.holder,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "what": self.what,
                "beat": self._beat,
                "time": time.time(),
                "ttl": self.ttl,
                "released": released,
            }
        ).encode()

    # ------------------------------------------------------------------ acquire
    def acquire(self, timeout: float = -1) -> None:
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        watched: tuple[int, bytes] | None = None
        since = time.monotonic()
        announced = False
        while True:
            gens = self._generations()
            top = gens[-1] if gens else 0
            free = not gens
            if gens:
                body = self._read(top)
                if body is None:  # removed under us (cleaned up by a new holder): look again
                    continue
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = {}
                if doc.get("released"):
                    free = True
                elif watched != (top, body):
                    watched, since = (top, body), time.monotonic()
                    if not announced:
                        log.info(
                            "waiting for %s, held by %s (pid %s)",
                            self.what,
                            doc.get("host"),
                            doc.get("pid"),
                        )
                        announced = True
                elif time.monotonic() - since >= self.ttl:
                    log.warning(
                        "%s: its holder %s (pid %s) has been silent for %.0f s; taking over",
                        self.what,
                        doc.get("host"),
                        doc.get("pid"),
                        time.monotonic() - since,
                    )
                    free = True
            if free:
                started = time.monotonic()
                try:
                    create_exclusive(self.fs, self._path(top + 1), self._body())
                except FileExistsError:
                    continue  # another host took this generation first: look again
                self._renewed = started
                self.generation = top + 1
                self._forget_older(gens)
                self._thread = threading.Thread(
                    target=self._heartbeat, name=f"lease-{self.what}", daemon=True
                )
                self._thread.start()
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.what}: not acquired within {timeout:.0f} s")
            time.sleep(self.poll * (0.75 + 0.5 * random.random()))

    def _forget_older(self, gens: list[int]) -> None:
        for g in gens:
            if self.generation is not None and g < self.generation:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(self._path(g))

    # ---------------------------------------------------------------- heartbeat
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 6):
            if not self._heartbeat_once():
                return

    def _expired(self) -> bool:
        """Whether this holder must give the lease up: ``ttl / 2`` of its own clock since
        the start of its last successful beat (a waiter needs ``ttl`` without a change)."""
        if not self.lost and time.monotonic() - self._renewed >= self.ttl / 2:
            self.lost = self.cut_off = True
            log.error(
                "%s: not renewed within %g s (the store did not answer); given up before "
                "another host may take it over",
                self.what,
                self.ttl / 2,
            )
        return self.lost

    def _heartbeat_once(self) -> bool:
        """One beat: False once the lease is lost (a newer generation exists, or it could
        not be renewed in time: then nothing more is written)."""
        try:
            if self._expired():
                return False
            newer = [g for g in self._generations() if g > (self.generation or 0)]
            if newer:
                if not self.lost:
                    log.error(
                        "%s: another host took over the lease (this process was silent for "
                        "more than %.0f s)",
                        self.what,
                        self.ttl,
                    )
                self.lost = True
                return False
            with self._write_lock:
                if self._stop.is_set() or self._expired():
                    return False
                self._beat += 1
                started = time.monotonic()
                write_by(
                    self.fs, self._path(self.generation), self._body(), self._renewed + self.ttl / 2
                )
                if not self._expired():  # renewed in time: valid from when it was sent
                    self._renewed = started
        except Exception as exc:  # a failed beat: try again; silence costs the lease
            log.warning("%s: heartbeat failed: %s", self.what, exc)
        return not self._expired()

    def check(self) -> None:
        """Raise ``LeaseLost`` if another host has taken this lease over, or if this holder
        could not renew it for ``ttl / 2`` seconds (then another host may soon)."""
        if self.generation is not None:
            self._expired()
        if self.cut_off:
            raise LeaseLost(
                f"{self.what}: the lease could not be renewed for {self.ttl / 2:g} s (the "
                "store did not answer), so it was given up before another host could take "
                "it over; nothing was committed"
            )
        if self.lost:
            raise LeaseLost(
                f"{self.what}: another host took over (this process was silent for more than "
                f"{self.ttl:.0f} s); nothing was committed"
            )

    # ------------------------------------------------------------------ release
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.generation is None or self.lost:
            return
        with self._write_lock, contextlib.suppress(Exception):
            self.fs.pipe_file(self._path(self.generation), self._body(released=True))
        self.generation = None


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = -1) -> Iterator[None]:
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store_error(exc, path.parent) from exc
    with FileLock(str(path), timeout=timeout):
        yield


#: the leases this thread holds right now, innermost last (``check_leases``)
_held = threading.local()


@contextlib.contextmanager
def lease(fs: Any, folder: str, what: str, timeout: float = -1) -> Iterator[Lease]:
    """Hold a lease on ``folder`` for the body of the ``with``."""
    proto = protocol_of(fs)
    if proto not in ATOMIC_CREATE:
        log.warning(
            "%s: the %s:// file system has no create-if-absent known to domaintune; the lock "
            "between hosts is best effort",
            what,
            proto,
        )
    held = Lease(fs, folder, what)
    try:
        held.acquire(timeout)
    except TimeoutError:
        raise
    except Exception as exc:  # an object store's client errors are not all OSErrors
        raise describe_remote_error(exc, f"{what}: taking the lock in {folder}") from exc
    stack = getattr(_held, "stack", [])
    _held.stack = [*stack, held]
    try:
        yield held
    finally:
        _held.stack = stack
        held.release()


def check_leases() -> None:
    """Raise ``LeaseLost`` if any lease this thread holds was taken over: called right
    before a commit, so a holder frozen past its lease commits nothing."""
    for held in getattr(_held, "stack", []):
        held.check()
