"""Checkpoints of a training in progress, and where they live.

A checkpoint ``checkpoint-<step>/`` is *complete* once rank 0 has written ``CHECKPOINT_MARKER``
in it, which it does after every rank has written its part (a barrier). A retried finetune
task resumes from the newest complete checkpoint.

With a remote store the checkpoints also live in the store, under
``<store>/finetune/.work/<key>/checkpoints/``: ``CheckpointMirror`` uploads each complete
checkpoint as soon as it is written (the marker last) and then writes ``STORED_MARKER`` beside
it; rank 0 waits for that before it trains on (``wait_until_stored``). A checkpoint therefore
counts only once it is in the store, so a retry on *any* host (another worker picked the flow
run up) downloads it and loses at most one checkpoint interval. The local folder is a cache.

The last checkpoint of a training that is ending (the step limit reached, or early stopping
decided) is marked ``final`` and stored only if the launch fails: on success the saved model
becomes the store's entry at once, and a task lost in between resumes from the checkpoint
before it (still at most one interval).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = ".domaintune-complete"
STORED_MARKER = ".domaintune-stored"
_MARKERS = (CHECKPOINT_MARKER, STORED_MARKER)


def _step(path: Path | str) -> int | None:
    try:
        return int(str(path).rstrip("/").rsplit("-", 1)[-1])
    except ValueError:
        return None


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """Newest checkpoint whose marker says every rank finished writing it.

    Unmarked checkpoints (a process killed while saving) are removed so that neither the
    Trainer's rotation nor a later resume ever looks at them.
    """
    if not output_dir.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for ckpt in output_dir.glob("checkpoint-*"):
        step = _step(ckpt.name)
        if step is None:
            continue
        if not (ckpt / CHECKPOINT_MARKER).is_file():
            log.warning("finetune: removing incomplete checkpoint %s", ckpt.name)
            shutil.rmtree(ckpt, ignore_errors=True)
            continue
        if best is None or step > best[0]:
            best = (step, ckpt)
    return best[1] if best else None


def wait_until_stored(ckpt: Path, timeout: float = 3600.0) -> None:
    """Rank 0, when checkpoints go to a remote store: return once ``ckpt`` is in it."""
    deadline = time.time() + timeout
    while not (ckpt / STORED_MARKER).is_file():
        if time.time() > deadline:
            raise TimeoutError(f"{ckpt.name} was not stored within {timeout:.0f} s")
        time.sleep(0.1)


def point_best_checkpoint_here(output_dir: Path) -> None:
    """``trainer_state.json`` names the best checkpoint by absolute path, which differs from
    host to host (each has its own cache): point it at this host's copy."""
    for state_file in output_dir.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        best = state.get("best_model_checkpoint")
        if best and (output_dir / Path(best).name).is_dir():
            here = str(output_dir / Path(best).name)
            if here != best:
                state["best_model_checkpoint"] = here
                state_file.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def _is_final(ckpt: Path) -> bool:
    try:
        return bool(json.loads((ckpt / CHECKPOINT_MARKER).read_text()).get("final"))
    except (OSError, ValueError):
        return False


class CheckpointMirror:
    """Keeps a training's working folder (checkpoints, attempts, log) in a remote store."""

    def __init__(self, store: Any, key: str, work: Path):
        self.enabled = not store.local
        self.fs = store.fs
        self.work = work
        self.remote = store.remote_path("finetune", ".work", key) if self.enabled else ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ restore
    def restore(self) -> list[str]:
        """Bring what the store holds of this training here (a retry on another host, or a
        deleted cache): complete checkpoints, the attempts so far, the log. Returns the
        names of the checkpoints downloaded."""
        if not self.enabled:
            return []
        from domaintune.storage.store import download_dir

        got = []
        ckpts = self.work / "checkpoints"
        for name in self._remote_checkpoints():
            local = ckpts / name
            if (local / CHECKPOINT_MARKER).is_file():
                continue
            download_dir(self.fs, f"{self.remote}/checkpoints/{name}", local)
            (local / STORED_MARKER).write_text("")
            got.append(name)
        point_best_checkpoint_here(ckpts)
        for name in ("attempts.json", "train.log"):
            remote = f"{self.remote}/{name}"
            local = self.work / name
            with contextlib.suppress(FileNotFoundError):
                data = self.fs.cat_file(remote)
                if not local.is_file() or local.stat().st_size < len(data):
                    local.write_bytes(data)
        if got:
            log.info("finetune: %d checkpoint(s) restored from the store: %s", len(got), got)
        return got

    def _remote_checkpoints(self) -> list[str]:
        """Complete checkpoints in the store, by name."""
        folder = f"{self.remote}/checkpoints"
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(folder)
        try:
            found = self.fs.glob(f"{folder}/checkpoint-*/{CHECKPOINT_MARKER}")
        except FileNotFoundError:
            return []
        return sorted(
            (p.rstrip("/").rsplit("/", 2)[-2] for p in found),
            key=lambda n: _step(n) or 0,
        )

    # ------------------------------------------------------------------ upload
    def save_file(self, name: str) -> None:
        """Upload one small file of the working folder (attempts.json, train.log)."""
        if not self.enabled:
            return
        p = self.work / name
        if p.is_file():
            self.fs.put_file(str(p), f"{self.remote}/{name}")

    def sync_once(self, include_final: bool = False) -> None:
        """Upload complete checkpoints not stored yet (a training's final one only with
        ``include_final``); forget stored ones the Trainer rotated away."""
        if not self.enabled:
            return
        ckpts = self.work / "checkpoints"
        local = {
            p.name
            for p in ckpts.glob("checkpoint-*")
            if (p / CHECKPOINT_MARKER).is_file() and _step(p.name) is not None
        }
        for name in sorted(local, key=lambda n: _step(n) or 0):
            ckpt = ckpts / name
            if (ckpt / STORED_MARKER).is_file():
                continue
            if not include_final and _is_final(ckpt):
                continue
            files = [p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name not in _MARKERS]
            dest = f"{self.remote}/checkpoints/{name}"
            t0 = time.time()
            self.fs.put(
                [str(p) for p in files], [f"{dest}/{p.relative_to(ckpt).as_posix()}" for p in files]
            )
            self.fs.put_file(str(ckpt / CHECKPOINT_MARKER), f"{dest}/{CHECKPOINT_MARKER}")
            (ckpt / STORED_MARKER).write_text("")
            log.info(
                "finetune: %s stored (%.1f MB in %.1f s)",
                name,
                sum(p.stat().st_size for p in files) / 2**20,
                time.time() - t0,
            )
        for name in self._remote_checkpoints():
            if name not in local and ckpts.is_dir():
                gone = f"{self.remote}/checkpoints/{name}"
                # its marker first: a host restoring meanwhile never takes what is left of
                # it for a complete checkpoint
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(f"{gone}/{CHECKPOINT_MARKER}")
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(gone, recursive=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.sync_once()
            except FileNotFoundError:
                continue  # rotated away while uploading: the next pass sees it gone
            except Exception as exc:  # the store is away: rank 0 keeps waiting, we retry
                self.error = exc
                log.warning("finetune: checkpoint upload failed (retrying): %s", exc)
                time.sleep(2)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Upload checkpoints in the background while the training runs (after a failed
        launch, call ``sync_once(include_final=True)``: its newest checkpoint counts)."""
        if not self.enabled:
            yield
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-upload", daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join(timeout=600)
            with contextlib.suppress(Exception):
                self.sync_once()
            with contextlib.suppress(Exception):
                self.save_file("train.log")

    def clear(self) -> None:
        """The training is in the store as an entry: its working folder is not needed."""
        if self.enabled:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.remote, recursive=True)
