"""The model registry of one use case: ``<store>/registry/<name>/``, in the store itself.

Layout (the same in a local folder and in an object store)::

    registry/<name>/
      v0001/              model/, metrics.json, evaluation.md, config.yaml, lineage.json,
                          registration.json (written last: the folder's own marker)
      log/000001.json     the event log: every registration, promotion and rollback, one
                          object each, written with create-if-absent
      latest, production  the pointers, rewritten after each event (for people and tools;
                          domaintune itself reads the log)
      claims/v0001.json   (object stores) a version number taken before anything is written

**The log is the registry's truth.** A version exists once a ``register`` event names it;
``latest`` is the newest registered version and ``production`` the top of the champion stack
(promotions push, rollbacks pop). An event is committed by creating the next log object only
if it does not exist yet, so of two writers that read the same state, one commits and the
other fails and writes nothing (the pointer moves "succeed only if the state is still what
was read"). Writers also hold the registry's lock (a lease in an object store), so in normal
operation the second writer simply waits; the create-if-absent fence covers a writer frozen
past its lease. On a remote store the log entries and version folders are immutable once
written, and a host's local copies of them are only a cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from domaintune.config.sections import (
    REGISTRY_REFERENCE,
    REGISTRY_REFERENCE_RULE,
    REGISTRY_SCHEME,
)
from domaintune.errors import DomainTuneError, ModelError, StoreError, shown, store_error
from domaintune.storage.coordination import check_leases, create_exclusive, numbered_objects
from domaintune.storage.store import Store, atomic_write_text, describe_remote_error

log = logging.getLogger(__name__)

MARKER = "registration.json"
LOG = "log"
_LEGACY_HISTORY = "history.jsonl"
#: ``NAME@production``, ``NAME@latest`` or ``NAME@vNNNN``, with or without the ``registry://``
#: scheme that ``model.name_or_path`` uses for it (``domaintune predict`` takes both)
#: the reference syntax is the config's (a field of model.name_or_path); resolving it is ours
SCHEME, REFERENCE, REFERENCE_RULE = REGISTRY_SCHEME, REGISTRY_REFERENCE, REGISTRY_REFERENCE_RULE


@dataclass
class RegistryState:
    """The registry as its log says it is."""

    events: list[dict[str, Any]] = field(default_factory=list)
    #: committed versions, oldest first: version -> its registration
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    latest: str | None = None
    #: champions in order: each promotion pushes, each rollback pops
    stack: list[str] = field(default_factory=list)

    @property
    def production(self) -> str | None:
        return self.stack[-1] if self.stack else None


def fold(events: list[dict[str, Any]]) -> RegistryState:
    state = RegistryState(events=events)
    for e in events:
        action = e.get("action", "register")
        version = e.get("version")
        if action == "register":
            state.versions[version] = e.get("registration") or {"version": version}
            state.latest = version
        if (action == "register" and e.get("promoted")) or action == "promote":
            if not state.stack or state.stack[-1] != version:
                state.stack.append(version)
        elif action == "rollback" and state.stack:
            state.stack.pop()
    return state


class Registry:
    """``registry/<name>/`` of a store."""

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self.fs = store.fs
        self.path = store.remote_path("registry", name)  # in self.fs
        self.url = store.url_of("registry", name)  # what people see
        self.cache = store.local_path("registry", name)  # the folder itself when local

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self.store.lock("registry", self.name):
            yield

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """OS errors of the store as StoreErrors naming the registry (no secrets)."""
        try:
            yield
        except (StoreError, DomainTuneError, FileExistsError):
            raise
        except OSError as exc:
            if self.store.local:
                raise store_error(exc, Path(self.path)) from exc
            raise describe_remote_error(exc, f"registry {self.url}: {what}") from exc
        except Exception as exc:  # an object store's client errors are not all OSErrors
            if self.store.local:
                raise
            raise describe_remote_error(exc, f"registry {self.url}: {what}") from exc

    # ------------------------------------------------------------------ the log
    def _log_numbers(self) -> list[int]:
        return numbered_objects(self.fs, f"{self.path}/{LOG}")

    def _event_path(self, number: int) -> str:
        return f"{self.path}/{LOG}/{number:06d}.json"

    def _read_event(self, number: int) -> dict[str, Any]:
        if self.store.local:
            return json.loads(Path(self._event_path(number)).read_text())
        cached = self.cache / LOG / f"{number:06d}.json"  # log entries never change
        if cached.is_file():
            return json.loads(cached.read_text())
        data = self.fs.cat_file(self._event_path(number))
        atomic_write_text(cached, data.decode())
        return json.loads(data)

    def events(self) -> list[dict[str, Any]]:
        """Every event, oldest first."""
        with self._guard("reading the log"):
            numbers = self._log_numbers()
            if not numbers:
                return self._legacy_events()
            return [self._read_event(n) for n in numbers]

    def state(self) -> RegistryState:
        return fold(self.events())

    def _legacy_events(self) -> list[dict[str, Any]]:
        """A registry written before the log (a local ``history.jsonl``): read as events."""
        p = f"{self.path}/{_LEGACY_HISTORY}"
        if not self.fs.exists(p):
            return []
        events = []
        for line in self.fs.cat_file(p).decode().splitlines():
            if not line.strip():
                continue
            e = json.loads(line)
            if e.get("action", "register") == "register":
                e["action"] = "register"
                marker = f"{self.path}/{e['version']}/{MARKER}"
                if not self.fs.exists(marker):
                    continue
                e["registration"] = json.loads(self.fs.cat_file(marker))
            events.append(e)
        return events

    def append(self, state: RegistryState, **event: Any) -> RegistryState:
        """Commit ``event`` after the events ``state`` was read from: the next log object,
        created only if nobody else created it since (then ``StoreError``, nothing written)."""
        event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}
        with self._guard("writing the log"):
            committed = self._log_numbers()
            if not committed and state.events:  # first write to a pre-log registry
                for i, old in enumerate(state.events, start=1):
                    create_exclusive(self.fs, self._event_path(i), json.dumps(old).encode())
                committed = list(range(1, len(state.events) + 1))
            if len(committed) != len(state.events):
                raise StoreError(
                    f"registry {self.url}: changed by another run since it was read "
                    f"({len(committed)} events, not {len(state.events)}); nothing written"
                )
            check_leases()
            try:
                create_exclusive(
                    self.fs, self._event_path(len(state.events) + 1), json.dumps(event).encode()
                )
            except FileExistsError as exc:
                raise StoreError(
                    f"registry {self.url}: another run committed event {len(state.events) + 1} "
                    "first; nothing written"
                ) from exc
        new = fold([*state.events, event])
        self._write_pointers(new)
        return new

    def _write_pointers(self, state: RegistryState) -> None:
        """``latest`` and ``production`` as the log says (a failure here is logged: the log
        already holds the truth, and the next event rewrites them)."""
        try:
            for pointer, value in (("latest", state.latest), ("production", state.production)):
                path = f"{self.path}/{pointer}"
                if value is None:
                    if self.fs.exists(path):
                        self.fs.rm_file(path)
                elif self.store.local:
                    atomic_write_text(path, value)
                else:
                    self.fs.pipe_file(path, value.encode())
        except (OSError, StoreError) as exc:
            log.warning(
                "registry %s: pointers not rewritten (the log is current): %s", self.url, exc
            )

    # ------------------------------------------------------------------ versions
    def staging_dir(self, version: str) -> Path:
        """A private local folder where a new version is put together."""
        tmp = self.cache / f".tmp-{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def next_version(self, state: RegistryState) -> str:
        """The next version number, taken (in an object store) by a create-if-absent claim, so
        that two writers never put files into the same version folder."""
        taken = [int(v[1:]) for v in state.versions if v[1:].isdigit()]
        number = max(taken, default=0) + 1
        if self.store.local:
            return f"v{number:04d}"
        with self._guard("claiming a version number"):
            while True:
                version = f"v{number:04d}"
                try:
                    # the token makes the claim this writer's own: a claim whose answer was
                    # lost and whose retry is refused is still recognised (no gap)
                    claim = {"pid": os.getpid(), "time": time.time(), "token": uuid.uuid4().hex}
                    create_exclusive(
                        self.fs, f"{self.path}/claims/{version}.json", json.dumps(claim).encode()
                    )
                    return version
                except FileExistsError:
                    number += 1

    def publish(self, version: str, staged: Path, server_copies: dict[str, str]) -> None:
        """Make the staged folder the version's folder in the store. ``server_copies``:
        destination (relative) -> source path in the store's file system, copied inside the
        object store (the model's weights: no download, no upload); the staged folder holds
        local copies of them for the cache. ``registration.json`` goes last."""
        final = f"{self.path}/{version}"
        if self.store.local:
            shutil.rmtree(final, ignore_errors=True)  # an earlier attempt that never committed
            try:
                os.replace(staged, final)
            except OSError as exc:
                raise store_error(exc, Path(final)) from exc
            return
        with self._guard(f"writing {version}"):
            files = [
                p
                for p in sorted(staged.rglob("*"))
                if p.is_file()
                and p.name != MARKER
                and p.relative_to(staged).as_posix() not in server_copies
            ]
            if files:
                self.fs.put(
                    [str(p) for p in files],
                    [f"{final}/{p.relative_to(staged).as_posix()}" for p in files],
                )
            for rel, src in server_copies.items():
                self.fs.copy(src, f"{final}/{rel}")
            check_leases()
            self.fs.put_file(str(staged / MARKER), f"{final}/{MARKER}")
        mirror = self.cache / version
        shutil.rmtree(mirror, ignore_errors=True)
        os.replace(staged, mirror)  # this host's cache already holds the whole version

    def discard(self, version: str) -> None:
        """Remove a version that was never committed (best effort).

        A register event whose write failed may still have been committed (the store wrote
        it, its answer was lost and the retries ran out): a version the log names, or one
        whose log cannot be read now, is kept, never half-removed."""
        shutil.rmtree(self.cache / version, ignore_errors=True)
        if self.store.local:
            return
        try:
            registered = version in self.state().versions
        except Exception as exc:  # the store is away: keeping an unused folder is harmless
            log.warning("registry %s: %s kept (the log cannot be read: %s)", self.url, version, exc)
            return
        if registered:
            log.warning("registry %s: %s was committed after all; kept", self.url, version)
            return
        with contextlib.suppress(Exception):
            self.fs.rm(f"{self.path}/{version}", recursive=True)
        with contextlib.suppress(Exception):
            self.fs.rm_file(f"{self.path}/claims/{version}.json")

    def version_dir(self, version: str) -> Path:
        """A local folder holding a committed version (downloaded once into the cache)."""
        local = self.cache / version
        if self.store.local or (local / MARKER).is_file():
            return local
        from domaintune.storage.store import download_dir

        with self._guard(f"reading {version}"):
            download_dir(self.fs, f"{self.path}/{version}", local)
        return local

    def version_url(self, version: str, *parts: str) -> str:
        return "/".join([self.url, version, *parts])

    # ------------------------------------------------------------------ queries
    def resolve(self, version: str, reference: str | None = None) -> str:
        """The committed version that ``version`` names (``production``, ``latest`` or
        ``vNNNN``); else a one-line ModelError naming ``reference`` and the rule broken."""
        reference = shown(reference or f"{self.name}@{version}")
        state = self.state()
        if not state.versions:
            known = use_cases(self.store)
            if not known:
                raise ModelError(
                    f"{reference}: the store {self.store.url_of()} has no registry (no use case "
                    "registered there yet); rule: a registry reference names a use case "
                    "registered in the same store (store.root)"
                )
            raise ModelError(
                f"{reference}: no use case {shown(self.name, quote=True)} in the registry of "
                f"{self.store.url_of()} (registered: {', '.join(known)})"
            )
        chosen = {"production": state.production, "latest": state.latest}.get(version, version)
        if chosen is None:
            raise ModelError(
                f"{reference}: no version of {shown(self.name, quote=True)} is in production "
                f"(versions: "
                f"{', '.join(state.versions)}; promote one with `domaintune models promote`)"
            )
        if chosen not in state.versions:
            raise ModelError(
                f"{reference}: {shown(self.name, quote=True)} has no version "
                f"{shown(version, quote=True)} (versions: "
                f"{', '.join(state.versions)}; or @production, @latest)"
            )
        return chosen

    def champion(self) -> dict[str, Any] | None:
        """The production version: version, local model folder, model fingerprint, metrics,
        the fingerprint of the tokenizer its data was tokenized with, and the files it was
        trained on."""
        state = self.state()
        version = state.production
        if not version or version not in state.versions:
            return None
        registration = state.versions[version]
        local = self.version_dir(version)
        lineage = json.loads((local / "lineage.json").read_text())
        fingerprint = registration.get("model_fingerprint") or lineage["model"]["fingerprint"]
        return {
            "version": version,
            "model_dir": str(local / "model"),
            "fingerprint": fingerprint,
            "tokenizer_fingerprint": lineage.get("tokenizer_fingerprint"),
            "recorded_metrics": registration.get("metrics", {}),
            "primary_metric": registration.get("primary_metric"),
            "recorded_interval": registration.get("interval"),
            # the files it was trained on (path, sha256): what landed since is new to it
            "sources": lineage.get("raw_snapshot", {}).get("sources", []),
            "raw_fingerprint": lineage.get("raw_snapshot", {}).get("fingerprint"),
        }

    def table(self) -> list[dict[str, Any]]:
        """Every version with its status: champion, former champion or rejected."""
        state = self.state()
        times = {e["version"]: e.get("time") for e in state.events if e.get("action") == "register"}
        rows = []
        for version, reg in state.versions.items():
            status = (
                "champion"
                if version == state.production
                else ("rejected" if not reg.get("promoted") else "former champion")
            )
            rows.append(
                {
                    "version": version,
                    "status": status,
                    "primary_metric": reg.get("primary_metric"),
                    "value": reg.get("metrics", {}).get(reg.get("primary_metric")),
                    "reason": reg.get("promotion_reason"),
                    "created_at": times.get(version),
                }
            )
        return rows

    def show(self, version: str) -> dict[str, Any]:
        state = self.state()
        if version not in state.versions:
            known = ", ".join(state.versions) or "none"
            raise DomainTuneError(
                f"{self.name}: no registered version {version!r} (known: {known})"
            )
        d = self.version_dir(version)
        return {
            "registration": json.loads((d / MARKER).read_text()),
            "lineage": json.loads((d / "lineage.json").read_text()),
            "metrics": json.loads((d / "metrics.json").read_text()),
            "config": yaml.safe_load((d / "config.yaml").read_text()),
            "production": state.production == version,
            "url": self.version_url(version),
        }

    # ------------------------------------------------------------------ by hand
    def promote(self, version: str, reason: str = "manual promotion") -> str:
        """Make ``version`` the champion by hand (the gate is not consulted: a person decided)."""
        with self.lock():
            state = self.state()
            self.show(version)  # exists?
            previous = state.production
            self.append(state, action="promote", version=version, previous=previous, reason=reason)
        log.info("models: %s production %s -> %s (%s)", self.name, previous, version, reason)
        return version

    def rollback(self, reason: str = "manual rollback") -> str:
        """Give production back to the champion before the current one."""
        with self.lock():
            state = self.state()
            if len(state.stack) < 2:
                raise DomainTuneError(
                    f"{self.name}: nothing to roll back to (production history: "
                    f"{state.stack or 'empty'})"
                )
            current, previous = state.stack[-1], state.stack[-2]
            self.append(state, action="rollback", version=previous, previous=current, reason=reason)
        log.info("models: %s rolled back %s -> %s", self.name, current, previous)
        return previous


def resolve_reference(store: Store, reference: str) -> tuple[str, str, Path]:
    """``[registry://]NAME@production|latest|vNNNN`` in ``store``: (use case, version, local
    folder of the version, downloaded once into the cache for a remote store)."""
    match = REFERENCE.match(reference)
    if match is None:
        raise ModelError(f"{shown(reference)}: not a registry reference; rule: {REFERENCE_RULE}")
    registry = Registry(store, match["name"])
    version = registry.resolve(match["version"], reference)
    return match["name"], version, registry.version_dir(version)


def use_cases(store: Store) -> list[str]:
    root = store.remote_path("registry")
    with contextlib.suppress(Exception):
        store.fs.invalidate_cache(root)
    try:
        entries = store.fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    return sorted(
        e["name"].rstrip("/").rsplit("/", 1)[-1]
        for e in entries
        if e.get("type") == "directory"
        and not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")
    )
