"""Landing zones: where new data for a domain arrives, and how its arrival becomes an event.

Each domain has a landing location ``<landing root>/<domain>/`` (the root: ``--landing``,
else ``$DOMAINTUNE_LANDING``, else ``./landing``): a local folder or an fsspec URL
(``s3://bucket/landing``, ``gs://...``, ``memory://...``). A domain's deployment reads every file there, so
a run trains on the accumulated dataset: earlier files plus new ones, deduplicated by
preprocess, as a new fingerprinted snapshot.

- :func:`add_files` lands files atomically (copied to a hidden temporary name, then renamed;
  on object stores an object is visible only once complete), never touching the originals; a name already taken by other content gets a content suffix.
- The ledger and the lock live in the landing location itself (a hidden ledger file, and a
  lease for object stores), so several hosts watching one landing zone announce a file once.
- :func:`scan` finds complete new files: not hidden or temporary (``.part``, ``.tmp``,
  ``.crdownload``), unchanged for ``settle_seconds``, and with content never announced before
  (a ledger of sha256 per domain, so a file copied twice or touched never fires twice).
  A file's age is read on one clock, the landing location's own: in an object store a
  file's time is the server's, so the scan writes a hidden ``.domaintune-clock`` object
  and takes the server's "now" from the same listing; a host whose clock is minutes off
  neither announces a file still being replaced nor waits minutes too long.
- :func:`announce` emits the Prefect event ``domaintune.data.arrived`` with resource id
  ``domaintune.domain.<domain>`` and the new files in its payload; the domain's deployment
  trigger turns it into a flow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from domaintune.errors import DataError

log = logging.getLogger(__name__)

EVENT = "domaintune.data.arrived"
TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".swp")
LEDGER = ".domaintune-announced.json"
#: written by each scan of an object store: its time in the listing is the store's "now"
CLOCK = ".domaintune-clock"
#: sizes seen by the previous scan, for file systems that report no modification time
_LAST_SIZES: dict[str, int] = {}
#: (file, size, modification time, ETag) -> sha256, for the files this process hashed: a
#: settled file is read once, not on every pass (announced files are known from the ledger)
_DIGESTS: dict[tuple[str, int, float | None, str | None], str] = {}


def landing_root(root: str | os.PathLike | None = None) -> str:
    """The landing root as a URL or an absolute local path."""
    r = str(root or os.environ.get("DOMAINTUNE_LANDING") or "landing")
    return r if "://" in r else str(Path(r).resolve())


_DOMAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_domain(domain: str) -> str:
    """A domain names one folder directly under the landing root: never a path."""
    if not _DOMAIN.match(domain or "") or ".." in domain:
        raise DataError(
            f"domain {domain!r}: rule: a domain is a plain name (letters, digits, '-', '_', "
            "'.') naming a folder inside the landing root, not a path ('..' and '/' are refused)"
        )
    return domain


def resource_id(domain: str) -> str:
    return f"domaintune.domain.{domain}"


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    from domaintune.storage.remote import with_retry_defaults

    fs, path = fsspec.core.url_to_fs(str(url), **with_retry_defaults(str(url), {}))
    return fs, path.rstrip("/")


def _full(fs: Any, path: str) -> str:
    """A path as the user would write it: local paths plain, others with their protocol."""
    from fsspec.implementations.local import LocalFileSystem

    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _sha256_fs(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: str | os.PathLike) -> str:
    fs, p = _fs(str(path))
    return _sha256_fs(fs, p)


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _is_candidate(rel: str) -> bool:
    parts = rel.split("/")
    return not any(x.startswith(".") for x in parts) and not parts[-1].endswith(TEMP_SUFFIXES)


def add_files(domain: str, files: list[str | os.PathLike], root: str | None = None) -> list[str]:
    """Copy files into the domain's landing location; returns the landed paths. Local
    folders get a hidden temporary name and a rename; object stores show an object only
    once it is complete."""
    fs, base = _fs(landing_root(root))
    dest_dir = f"{base}/{check_domain(domain)}"
    fs.makedirs(dest_dir, exist_ok=True)
    landed = []
    for f in files:
        src = Path(f)
        if not src.is_file():
            raise DataError(f"data add: {src}: no such file")
        digest = _sha256(src)
        dest = f"{dest_dir}/{src.name}"
        if fs.exists(dest):
            if _sha256_fs(fs, dest) == digest:
                log.info("data add: %s is already in %s", src.name, _full(fs, dest_dir))
                landed.append(_full(fs, dest))
                continue
            dest = f"{dest_dir}/{src.stem}-{digest[:8]}{src.suffix}"
        tmp = f"{dest_dir}/.{src.name}.{os.getpid()}.part"
        fs.put_file(str(src), tmp)
        fs.mv(tmp, dest)  # appears complete or not at all
        landed.append(_full(fs, dest))
        log.info("data add: landed %s -> %s", src, _full(fs, dest))
    return landed


def _ledger(fs: Any, domain_dir: str) -> dict[str, Any]:
    p = f"{domain_dir}/{LEDGER}"
    return json.loads(fs.cat_file(p)) if fs.exists(p) else {"announced": {}}


def scan(domain_dir: str | os.PathLike, settle_seconds: float = 2.0) -> list[dict[str, Any]]:
    """New complete files of one domain's landing location (not yet announced), oldest
    first. Settled: unchanged for ``settle_seconds`` (or, where the file system keeps no
    modification time, the same size as in the previous scan)."""
    fs, d = _fs(str(domain_dir))
    if not fs.isdir(d):
        return []
    seen = _ledger(fs, d)["announced"]
    # announced files, by what a listing shows of them: unchanged ones are not read again
    stamps = {
        (a["path"], a["bytes"], a["mtime"]): sha
        for sha, a in seen.items()
        if a.get("mtime") is not None and "bytes" in a
    }
    listing, now = _listing_and_now(fs, d)
    new = []
    for path, info in sorted(listing.items()):
        rel = path[len(d) + 1 :]
        if info.get("type") != "file" or not _is_candidate(rel):
            continue
        mtime = _mtime(info)
        key = _full(fs, path)
        size = int(info.get("size") or 0)
        settled = (
            now - mtime >= settle_seconds
            if mtime is not None and now is not None
            else _LAST_SIZES.get(key) == size
        )
        _LAST_SIZES[key] = size
        if not settled:
            continue  # still being written (or just landed): look again next time
        if (key, size, mtime) in stamps:
            continue
        stamp = (key, size, mtime, info.get("ETag") or info.get("etag"))
        known = mtime is not None or stamp[3] is not None
        digest = _DIGESTS.get(stamp) if known else None
        if digest is None:
            digest = _sha256_fs(fs, path)
            if known:
                _DIGESTS[stamp] = digest
        if digest in seen or digest in {f["sha256"] for f in new}:
            continue  # announced before, or a copy of a file of this pass
        new.append({"path": key, "sha256": digest, "bytes": size, "mtime": mtime})
    return sorted(new, key=lambda f: f["mtime"] or 0)


def _listing_and_now(fs: Any, d: str) -> tuple[dict[str, Any], float | None]:
    """The files under ``d`` and the time now on the clock that stamped them: this host's
    for a local folder; for any other file system the time its server gives an object
    written just before listing (None if it cannot be written: then a file is settled when
    two scans see it the same size)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        now = time.time()
        return fs.find(d, detail=True, withdirs=False), now
    try:
        fs.pipe_file(f"{d}/{CLOCK}", b"")
    except Exception as exc:  # a read-only landing location: no clock of its own
        log.debug("landing %s: no clock object (%s)", d, exc)
    listing = fs.find(d, detail=True, withdirs=False)
    clock = listing.get(f"{d}/{CLOCK}")
    return listing, _mtime(clock) if clock is not None else None


def mark_announced(domain_dir: str | os.PathLike, files: list[dict[str, Any]]) -> None:
    fs, d = _fs(str(domain_dir))
    ledger = _ledger(fs, d)
    for f in files:
        ledger["announced"][f["sha256"]] = {
            "path": f["path"],
            "bytes": f["bytes"],
            "mtime": f["mtime"],
            "time": time.time(),
        }
    tmp = f"{d}/.{LEDGER}.{os.getpid()}.tmp"
    fs.pipe_file(tmp, json.dumps(ledger, indent=2).encode())
    fs.mv(tmp, f"{d}/{LEDGER}")


def announce(domain: str, files: list[dict[str, Any]]) -> Any:
    """Emit ``domaintune.data.arrived`` for the domain; returns the event (None when no
    Prefect API is configured to receive it)."""
    from prefect.events import emit_event

    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": resource_id(domain), "prefect.resource.name": domain},
        payload={"domain": domain, "files": files},
    )
    log.info("data: %s for %s with %d file(s)", EVENT, domain, len(files))
    return event


def _lock(domain_url: str):
    """One lock per landing location, so a file is announced once: a file lock for a local
    folder; for an object store a lease in the landing location itself (its hidden
    ``.domaintune-lock/`` folder), so that watchers and ``data add`` on several hosts take
    turns too."""
    from domaintune.storage.coordination import file_lock, lease

    fs, d = _fs(domain_url)
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        locks = Path.home() / ".cache" / "domaintune" / "landing-locks"
        name = hashlib.sha256(domain_url.encode()).hexdigest()[:16]
        return file_lock(locks / f"{name}.lock")
    return lease(fs, f"{d}/.domaintune-lock", f"landing lock of {domain_url}")


def land_and_announce(
    domain: str, files: list[str | os.PathLike], root: str | None = None, emit: bool = True
) -> list[dict[str, Any]]:
    """``domaintune data add``: land the files, then announce those not announced before
    (under the domain's lock, so the watcher never announces them a second time)."""
    domain_url = f"{landing_root(root).rstrip('/')}/{check_domain(domain)}"
    with _lock(domain_url):
        landed = add_files(domain, files, root)
        fs, d = _fs(domain_url)
        seen = _ledger(fs, d)["announced"]
        infos = []
        for path in landed:
            digest = _sha256(path)
            if digest not in seen and digest not in {i["sha256"] for i in infos}:
                info = fs.info(_fs(path)[1])
                infos.append(
                    {
                        "path": path,
                        "sha256": digest,
                        "bytes": int(info.get("size") or 0),
                        "mtime": _mtime(info),
                    }
                )
        if infos and emit:
            announce(domain, infos)
        if infos:
            mark_announced(domain_url, infos)
    return infos


def watch_once(
    root: str | os.PathLike, domains: list[str] | None = None, settle_seconds: float = 2.0
) -> dict:
    """One pass over the landing zones: announce each domain's new complete files once."""
    root = landing_root(root)
    fs, base = _fs(root)
    fired = {}
    if domains:
        names = list(domains)
    elif fs.isdir(base):
        names = sorted(
            p.rstrip("/").rsplit("/", 1)[-1]
            for p in fs.ls(base, detail=False)
            if fs.isdir(p) and not p.rstrip("/").rsplit("/", 1)[-1].startswith(".")
        )
    else:
        names = []
    for domain in names:
        domain_url = f"{root.rstrip('/')}/{domain}"
        with _lock(domain_url):
            new = scan(domain_url, settle_seconds)
            if new:
                announce(domain, new)
                mark_announced(domain_url, new)
                fired[domain] = new
    return fired


def watch(
    root: str | os.PathLike,
    domains: list[str] | None = None,
    interval: float = 2.0,
    settle_seconds: float = 2.0,
    stop: Any = None,
) -> None:
    """Poll the landing zones until ``stop`` (a threading.Event) is set or interrupted."""
    log.info("watch: %s every %.1f s (files settle for %.1f s)", root, interval, settle_seconds)
    while stop is None or not stop.is_set():
        try:
            watch_once(root, domains, settle_seconds)
        except Exception as exc:  # a bad pass must not stop the watcher
            log.warning("watch: pass failed: %s", exc)
        if stop is not None:
            stop.wait(interval)
        else:
            time.sleep(interval)
