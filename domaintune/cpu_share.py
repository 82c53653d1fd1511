"""One host's cores shared between the CPU-heavy processes of several runs.

Two domains' runs landing on one worker host, or a training beside another run's evaluation,
is normal in production. Each process sized its thread pool for the whole machine, so two of
them ran 2x as many busy threads as there are cores: OpenMP's spinning threads then fight
for the cores and both slow down far more than 2x (a training measured 5x slower beside a
generating process on 2 cores).

Each CPU-heavy process (a training rank on CPU; the evaluation, scoring or generation of a
task process) takes a *slot* here: a file in a host-local folder, held with ``flock`` for as
long as the process works (the kernel drops the lock when a process dies, so a killed
process frees its slot). A process uses ``cores // slots`` threads, at least one, and looks
again every ``REFRESH_SECONDS`` between steps or batches (``refresh()``): a training that
runs alone uses every core, and drops to its share when another run starts beside it.

``DOMAINTUNE_CPU_SHARE=0`` turns it off (each process then sizes for the whole machine, as
PyTorch does); ``DOMAINTUNE_CPU_SHARE_DIR`` names the folder (every process of the host must
use the same one; the tests give each test its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0


def enabled() -> bool:
    return os.environ.get("DOMAINTUNE_CPU_SHARE", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def host_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or a taskset's
    limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share_dir() -> Path:
    explicit = os.environ.get("DOMAINTUNE_CPU_SHARE_DIR")
    if explicit:
        return Path(explicit)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"domaintune-cpu-share-{os.getuid()}"


class Slot:
    """This process's slot (see the module's docstring)."""

    def __init__(self, what: str, folder: Path | None = None, cores: int | None = None):
        self.what = what
        self.folder = folder or share_dir()
        self.cores = cores or host_cores()
        self.threads = 0
        self._checked = 0.0
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.slot"
        # locked under a temporary name, then renamed: a slot is never seen unlocked
        tmp = self.folder / f".{name}"
        self._fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._fd, what.encode()[:200])
        self.path = self.folder / name
        os.replace(tmp, self.path)

    def slots(self) -> int:
        """The slots held on this host now, this one included; slots of dead processes are
        removed on the way."""
        held = 1
        for p in self.folder.glob("*.slot"):
            if p == self.path:
                continue
            try:
                fd = os.open(p, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held += 1  # its process is alive and working
            else:  # nobody holds it: its process died without closing it
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            finally:
                os.close(fd)
        return held

    def share(self) -> int:
        """Threads for this process: its share of the cores, at least one."""
        return max(1, self.cores // self.slots())

    def refresh(self, force: bool = False) -> int:
        """Set PyTorch's threads to this process's share (at most every REFRESH_SECONDS).
        Call it from the thread that computes: OpenMP's thread count is per thread."""
        now = time.monotonic()
        if not force and now - self._checked < REFRESH_SECONDS:
            return self.threads
        self._checked = now
        threads = self.share()
        if threads != self.threads:
            import torch

            torch.set_num_threads(threads)
            if self.threads:
                log.info(
                    "%s: %d thread(s) now (%d core(s) shared by %d CPU-heavy process(es) on "
                    "this host)",
                    self.what,
                    threads,
                    self.cores,
                    self.slots(),
                )
            self.threads = threads
        return threads

    def close(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


#: the slot of this process, while it holds one (``refresh`` looks here)
_current: Slot | None = None


@contextlib.contextmanager
def cpu_slot(what: str) -> Iterator[Slot | None]:
    """Hold a slot for the body of the ``with`` (nothing on a GPU machine, with the
    sharing turned off, or inside another slot of this process); the threads PyTorch had
    come back afterwards."""
    global _current
    if _current is not None or not enabled() or _on_gpu():
        yield _current
        return
    import torch

    before = torch.get_num_threads()
    try:
        slot = Slot(what)
    except OSError as exc:  # a read-only /dev/shm: work as before rather than fail
        log.debug("no CPU slot (%s): threads as PyTorch sized them", exc)
        yield None
        return
    _current = slot
    try:
        slot.refresh(force=True)
        yield slot
    finally:
        _current = None
        slot.close()
        torch.set_num_threads(before)


def refresh() -> None:
    """Between steps or batches: take this process's current share of the cores."""
    if _current is not None:
        _current.refresh()


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
