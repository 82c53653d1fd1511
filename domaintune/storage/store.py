"""The content-addressed store of intermediates: ``<root>/<stage>/<key>/``.

An entry is complete only when its completion marker ``_COMPLETE.json`` exists and the files it
lists are present with the listed sizes. Writes are atomic: a stage writes into a private
temporary directory, which is renamed into place and only then marked complete, so a crash
never leaves an entry that a later run would take as complete. A per-entry file lock makes
concurrent runs of the same config compute each entry once.

The root is a local path or any fsspec URL. Stages always read and write local directories;
for a remote root the store uploads on commit and mirrors entries into a local cache on read.
The remote root is then the single source of truth: the local cache (``$DOMAINTUNE_CACHE``,
else ``~/.cache/domaintune``) can be deleted at any time, and locks are leases in the object
store itself (``domaintune.storage.coordination``), so runs on several hosts compute an entry once.
Transient faults of an object store are retried by its client (``domaintune.storage.remote``),
every write is safe to retry, and a failure that outlasts the retries is one line naming the
store and the operation (``writing <stage>/<key>``, ``reading ...``, ``downloading ...``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from domaintune.errors import StoreAccessError, StoreError, disk_full, store_error
from domaintune.fingerprint import hash_obj, stable_json
from domaintune.redaction import redact
from domaintune.storage.coordination import (
    ATOMIC_CREATE,
    check_leases,
    create_exclusive,
    file_lock,
    lease,
    protocol_of,
)
from domaintune.storage.remote import describe_remote_error, first_line, with_retry_defaults

log = logging.getLogger(__name__)

MARKER = "_COMPLETE.json"
M = TypeVar("M")


def _is_local(root: str) -> bool:
    return "://" not in root or root.startswith("file://")


def _strip_file_scheme(root: str) -> str:
    return root[len("file://") :] if root.startswith("file://") else root


class Store:
    """A content-addressed, crash-safe store of stage outputs."""

    def __init__(self, root: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        """``storage_options``: fsspec options of a remote root (store.storage_options;
        ``${env:NAME}`` read from the environment now)."""
        root = os.fspath(root)
        self.url = root
        self.local = _is_local(root)
        if self.local:
            self.root = Path(_strip_file_scheme(root)).expanduser().resolve()
            self.fs = fsspec.filesystem("file")
            self._cache_root = self.root
        else:
            self.root = None
            from domaintune.credentials import resolve_env_refs

            options = resolve_env_refs(storage_options, "store.storage_options")
            # transient faults are retried with backoff by the client (storage.remote)
            options = with_retry_defaults(root, options)
            # other hosts change the store: never answer from a listing cached earlier
            options.setdefault("use_listings_cache", False)
            try:
                self.fs, self._remote_root = fsspec.core.url_to_fs(root, **options)
            except ImportError as exc:
                raise StoreAccessError(
                    f"store.root {root}: {exc} (for s3:// install domaintune's s3 extra: "
                    "pip install 'domaintune[s3]')"
                ) from exc
            self._remote_root = self._remote_root.rstrip("/")
            self._cache_root = cache_root() / "store-mirror" / hash_obj(root, length=12)

    @classmethod
    def of(cls, config: Any) -> Store:
        """The store of a run's config (store.root with store.storage_options), checked to
        be reachable once per process."""
        store = cls(config.store.root, config.store.storage_options)
        store.check_reachable()
        return store

    _reachable: set[str] = set()

    def check_reachable(self) -> None:
        """A remote store answers and these credentials may use it; else a one-line error
        (``StoreAccessError`` for refused credentials or a missing bucket, ``StoreError``
        for a store that cannot be reached, which a retry may fix)."""
        if self.local or self.url in Store._reachable:
            return
        try:
            self.fs.ls(self._remote_root.split("/", 1)[0], detail=False)
        except FileNotFoundError as exc:
            raise StoreAccessError(
                f"store {redact(self.url)}: the bucket does not exist ({first_line(exc)})"
            ) from exc
        except Exception as exc:
            raise describe_remote_error(exc, f"store {redact(self.url)}") from exc
        Store._reachable.add(self.url)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ----------------------------------------------------------------- paths
    def entry_path(self, stage: str, key: str) -> Path:
        """Local path of an entry (the entry itself for a local store, else its mirror)."""
        return self._cache_root / stage / key

    def local_path(self, *parts: str) -> Path:
        """Local path of anything in the store (itself for a local store, else the cache)."""
        return self._cache_root.joinpath(*parts)

    def remote_path(self, *parts: str) -> str:
        """The path of anything in the store in its file system (``self.fs``): the local
        path for a local store, the object key path for a remote one."""
        base = str(self.root) if self.local else self._remote_root
        return "/".join([base.rstrip("/"), *parts])

    def url_of(self, *parts: str) -> str:
        """What a person would type to find it: a local path, or the remote URL."""
        if self.local:
            return str(self.root.joinpath(*parts))
        return "/".join([self.url.rstrip("/"), *parts])

    def _remote_entry(self, stage: str, key: str) -> str:
        return self.remote_path(stage, key)

    def scratch_dir(self, stage: str, key: str) -> Path:
        """A persistent local working folder for an entry still being computed.

        Training keeps its checkpoints here so that a retried task resumes from them.
        """
        path = self._cache_root / stage / ".work" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------- reading
    def is_complete(self, stage: str, key: str) -> bool:
        return self.read_marker(stage, key) is not None

    def read_marker(self, stage: str, key: str) -> dict[str, Any] | None:
        """The entry's marker if the entry is complete and intact, else None."""
        if self.local:
            entry = self.entry_path(stage, key)
            marker = entry / MARKER
            if not marker.is_file():
                return None
            try:
                data = json.loads(marker.read_text())
            except (OSError, ValueError):
                log.warning("store entry %s/%s has an unreadable marker; recomputing", stage, key)
                return None
            sizes = {
                rel: (entry / rel).stat().st_size
                for rel in data.get("files", {})
                if (entry / rel).is_file()
            }
            return data if _intact(stage, key, data, sizes) else None
        remote = self._remote_entry(stage, key)
        try:
            data = json.loads(self.fs.cat_file(f"{remote}/{MARKER}"))
            # the marker is written last, so its files are there; unless someone removed or
            # rewrote some since: a damaged entry is recomputed, never used
            found = self.fs.find(remote, detail=True, withdirs=False)
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("store entry %s/%s has an unreadable marker; recomputing", stage, key)
            return None
        except Exception as exc:
            raise describe_remote_error(
                exc, f"store {redact(self.url)}: reading {stage}/{key}"
            ) from exc
        sizes = {p[len(remote) + 1 :]: int(i.get("size") or 0) for p, i in found.items()}
        return data if _intact(stage, key, data, sizes) else None

    def manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        marker = self.read_marker(stage, key)
        return None if marker is None else marker["manifest"]

    def compute_once(
        self, stage: str, key: str, manifest_type: type[M], compute: Callable[[], M]
    ) -> M:
        """A stage's output for ``key``: reused from the store when complete (with
        ``reused=True``), else computed, under the entry's lock so concurrent runs compute it
        once."""
        with self.lock(stage, key):
            cached = self.cached_manifest(stage, key)
            if cached is not None:
                log.info("%s: reusing store entry %s", stage, key)
                return manifest_type.model_validate({**cached, "reused": True})  # type: ignore[attr-defined]
            try:
                return compute()
            except OSError as exc:
                if not disk_full(exc):
                    raise
                # one line naming the file (else the stage's folder) and the entry it was
                # for; the writer removed its temporary folder, so nothing looks complete
                where = exc.filename or self._cache_root / stage
                raise store_error(exc, f"{where} (the {stage} entry {key})") from exc

    def cached_manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        """The manifest of a complete entry, with the entry available locally; else None.

        For a remote store the entry is mirrored into the local cache and the manifest's
        paths (written by whichever machine computed it) are pointed at the local mirror.
        """
        manifest = self.manifest(stage, key)
        if manifest is None or self.local:
            return manifest
        local = self.materialize(stage, key)
        written_at = manifest.get("path")
        if written_at and written_at != str(local):
            manifest = json.loads(json.dumps(manifest).replace(written_at, str(local)))
        return manifest

    def materialize(self, stage: str, key: str) -> Path:
        """Local directory holding a complete entry (downloads it for a remote store)."""
        local = self.entry_path(stage, key)
        if self.local or (local / MARKER).is_file():
            return local
        try:
            download_dir(self.fs, self._remote_entry(stage, key), local)
        except Exception as exc:
            raise describe_remote_error(
                exc, f"store {redact(self.url)}: downloading {stage}/{key}"
            ) from exc
        return local

    # ------------------------------------------------------------- writing
    @contextlib.contextmanager
    def lock(self, stage: str, key: str, timeout: float = -1) -> Iterator[None]:
        """Hold the lock of ``stage/key``: concurrent runs compute an entry once (a file lock
        in a local store; a lease in the object store itself for a remote one, so that runs
        on other hosts wait too)."""
        if self.local:
            with file_lock(self._cache_root / stage / ".locks" / f"{key}.lock", timeout):
                yield
            return
        folder = self.remote_path(".locks", stage, key)
        with lease(self.fs, folder, f"lock {stage}/{key} of {redact(self.url)}", timeout):
            yield

    @contextlib.contextmanager
    def writer(self, stage: str, key: str) -> Iterator[EntryWriter]:
        """Write an entry atomically: yields a private temporary directory.

        On a clean exit the directory becomes the entry and the marker is written last;
        on an exception the temporary directory is removed and nothing becomes visible.
        """
        stage_dir = self._cache_root / stage
        try:
            stage_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=stage_dir))
        except OSError as exc:
            raise store_error(exc, stage_dir) from exc
        w = EntryWriter(tmp)
        try:
            yield w
            self._commit(stage, key, tmp, w.manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, stage: str, key: str, tmp: Path, manifest: dict[str, Any]) -> None:
        files = {
            str(p.relative_to(tmp)): p.stat().st_size
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.name != MARKER
        }
        marker = {
            "stage": stage,
            "key": key,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
            "manifest": manifest,
        }
        final = self.entry_path(stage, key)
        try:
            if final.exists():  # an earlier attempt died between rename and marker
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(final / MARKER, stable_json(marker))
        except OSError as exc:
            raise store_error(exc, final) from exc
        if not self.local:
            self._upload(stage, key, final, stable_json(marker).encode())

    def _upload(self, stage: str, key: str, final: Path, marker: bytes) -> None:
        """The entry's files, then its marker: a remote reader never sees a partial entry.

        Every request is retried by the client (``storage.remote``); a marker that another
        run created meanwhile (this run was cut off past its lease) is left alone."""
        remote = self._remote_entry(stage, key)
        what = f"store {redact(self.url)}: writing {stage}/{key}"
        try:
            # a damaged entry being recomputed: no reader may take its old marker for the
            # files about to be replaced
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f"{remote}/{MARKER}")
            upload_dir(self.fs, final, remote, skip=(MARKER,))
            check_leases()  # a holder taken over while uploading commits nothing
            if protocol_of(self.fs) in ATOMIC_CREATE:
                create_exclusive(self.fs, f"{remote}/{MARKER}", marker)
            else:
                self.fs.pipe_file(f"{remote}/{MARKER}", marker)
        except FileExistsError as exc:
            check_leases()
            raise StoreError(
                f"{what}: another run completed this entry while this one wrote it (this "
                "run's lease was lost); its marker was not overwritten"
            ) from exc
        except Exception as exc:  # an object store's client errors are not all OSErrors
            raise describe_remote_error(exc, what) from exc


def _intact(stage: str, key: str, marker: dict[str, Any], sizes: dict[str, int]) -> bool:
    """Whether every file the marker names is there (``sizes``: relative path -> size, as
    found) at the size it names; a damaged entry is recomputed, never used."""
    for rel, size in marker.get("files", {}).items():
        if sizes.get(rel) != size:
            log.warning(
                "store entry %s/%s is damaged (%s missing or resized); recomputing", stage, key, rel
            )
            return False
    return True


def cache_root() -> Path:
    """This host's local cache of remote stores (and of converted models)."""
    return Path(os.environ.get("DOMAINTUNE_CACHE", Path.home() / ".cache" / "domaintune"))


def upload_dir(fs: Any, local: Path, remote: str, skip: tuple[str, ...] = ()) -> None:
    """Every file under ``local`` to ``remote`` (same relative paths)."""
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p.name not in skip]
    if not files:
        return
    fs.put(
        [str(p) for p in files],
        [f"{remote}/{p.relative_to(local).as_posix()}" for p in files],
    )


def download_dir(fs: Any, remote: str, local: Path) -> None:
    """The files under ``remote`` into ``local``, which appears whole or not at all."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".dl-{local.name}-", dir=local.parent))
    try:
        found = fs.find(remote, withdirs=False)
        if found:
            rels = [f[len(remote.rstrip("/")) + 1 :] for f in found]
            for rel in rels:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get(found, [str(tmp / rel) for rel in rels])
        if local.exists():
            shutil.rmtree(local)
        os.replace(tmp, local)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):  # this host's cache is full: name it, not the remote side
            raise store_error(exc, f"{local} (this host's copy of {redact(remote)})") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class EntryWriter:
    """Handed to a stage while it writes an entry: the directory plus the manifest to record."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: dict[str, Any] = {}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(p, text)
    except OSError as exc:
        raise store_error(exc, p) from exc
