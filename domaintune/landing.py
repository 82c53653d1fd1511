"""Landing zones: where new data for a domain arrives, and how its arrival becomes an event.

Each domain has a folder ``<landing root>/<domain>/`` (the root: ``--landing``, else
``$DOMAINTUNE_LANDING``, else ``./landing``). A domain's deployment reads every file there, so
a run trains on the accumulated dataset: earlier files plus new ones, deduplicated by
preprocess, as a new fingerprinted snapshot.

- :func:`add_files` lands files atomically (copied to a hidden temporary name, then renamed),
  never touching the originals; a name already taken by other content gets a content suffix.
- :func:`scan` finds complete new files: not hidden or temporary (``.part``, ``.tmp``,
  ``.crdownload``), unchanged for ``settle_seconds``, and with content never announced before
  (a ledger of sha256 per domain, so a file copied twice or touched never fires twice).
- :func:`announce` emits the Prefect event ``domaintune.data.arrived`` with resource id
  ``domaintune.domain.<domain>`` and the new files in its payload; the domain's deployment
  trigger turns it into a flow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from domaintune.errors import DataError

log = logging.getLogger(__name__)

EVENT = "domaintune.data.arrived"
TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".swp")
LEDGER = ".domaintune-announced.json"


def landing_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("DOMAINTUNE_LANDING") or "landing").resolve()


def resource_id(domain: str) -> str:
    return f"domaintune.domain.{domain}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_candidate(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and not p.name.endswith(TEMP_SUFFIXES)


def add_files(domain: str, files: list[str | os.PathLike], root: Path | None = None) -> list[Path]:
    """Copy files into the domain's landing folder atomically; returns the landed paths."""
    dest_dir = landing_root(root) / domain
    dest_dir.mkdir(parents=True, exist_ok=True)
    landed = []
    for f in files:
        src = Path(f)
        if not src.is_file():
            raise DataError(f"data add: {src}: no such file")
        digest = _sha256(src)
        dest = dest_dir / src.name
        if dest.exists():
            if _sha256(dest) == digest:
                log.info("data add: %s is already in %s", src.name, dest_dir)
                landed.append(dest)
                continue
            dest = dest_dir / f"{src.stem}-{digest[:8]}{src.suffix}"
        tmp = dest_dir / f".{dest.name}.{os.getpid()}.part"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)  # the file appears complete or not at all
        landed.append(dest)
        log.info("data add: landed %s -> %s", src, dest)
    return landed


def _ledger(domain_dir: Path) -> dict[str, Any]:
    p = domain_dir / LEDGER
    return json.loads(p.read_text()) if p.is_file() else {"announced": {}}


def scan(domain_dir: Path, settle_seconds: float = 2.0) -> list[dict[str, Any]]:
    """New complete files of one domain (not yet announced), oldest first."""
    if not domain_dir.is_dir():
        return []
    seen = _ledger(domain_dir)["announced"]
    now = time.time()
    new = []
    for p in sorted(domain_dir.rglob("*")):
        hidden = any(part.startswith(".") for part in p.relative_to(domain_dir).parts)
        if hidden or not _is_candidate(p):
            continue
        st = p.stat()
        if now - st.st_mtime < settle_seconds:
            continue  # still being written (or just landed): look again next time
        digest = _sha256(p)
        if digest in seen:
            continue
        new.append({"path": str(p), "sha256": digest, "bytes": st.st_size, "mtime": st.st_mtime})
    return sorted(new, key=lambda f: f["mtime"])


def mark_announced(domain_dir: Path, files: list[dict[str, Any]]) -> None:
    ledger = _ledger(domain_dir)
    for f in files:
        ledger["announced"][f["sha256"]] = {"path": f["path"], "time": time.time()}
    tmp = domain_dir / f".{LEDGER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(ledger, indent=2))
    os.replace(tmp, domain_dir / LEDGER)


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


def _lock(domain_dir: Path):
    from filelock import FileLock

    domain_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(domain_dir / ".domaintune.lock"))


def land_and_announce(
    domain: str, files: list[str | os.PathLike], root: Path | None = None, emit: bool = True
) -> list[dict[str, Any]]:
    """``domaintune data add``: land the files, then announce those not announced before
    (under the domain's lock, so the watcher never announces them a second time)."""
    domain_dir = landing_root(root) / domain
    with _lock(domain_dir):
        landed = add_files(domain, files, root)
        seen = _ledger(domain_dir)["announced"]
        infos = []
        for p in landed:
            digest = _sha256(p)
            if digest not in seen and digest not in {i["sha256"] for i in infos}:
                st = p.stat()
                infos.append(
                    {"path": str(p), "sha256": digest, "bytes": st.st_size, "mtime": st.st_mtime}
                )
        if infos and emit:
            announce(domain, infos)
        if infos:
            mark_announced(domain_dir, infos)
    return infos


def watch_once(root: Path, domains: list[str] | None = None, settle_seconds: float = 2.0) -> dict:
    """One pass over the landing zones: announce each domain's new complete files once."""
    fired = {}
    if domains:
        names = list(domains)
    elif root.is_dir():
        names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    else:
        names = []
    for domain in names:
        d = root / domain
        if not d.is_dir():
            continue
        with _lock(d):
            new = scan(d, settle_seconds)
            if new:
                announce(domain, new)
                mark_announced(d, new)
                fired[domain] = new
    return fired


def watch(
    root: Path,
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
