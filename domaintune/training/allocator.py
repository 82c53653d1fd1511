"""The memory allocator of a CPU training rank.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above
its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap``
on free, so a tensor of that size that each step allocates again is zero-filled page by
page through page faults every step: for all-MiniLM-L6-v2 the 47 MB word-embedding
gradient alone took 9 ms of a 180 ms bf16 step in ``fill_``. TCMalloc keeps freed memory for
reuse, as PyTorch's own guide for CPU training recommends (with jemalloc, which measured no
faster here untuned): the same step 180 -> 160 ms at 32 tokens, 333 -> 304 ms at 64
(docs/results.md, issue 16). The allocator changes no result, only where memory comes from.

A rank re-executes itself with the library preloaded before it imports anything heavy
(``LD_PRELOAD`` only takes effect at process start), on its own host, so each host of a
multi-node launch uses what it has. Debian / Ubuntu: ``libtcmalloc-minimal4`` (installed by
``make install``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: what ``training.cpu_allocator: auto`` looks for, best first (TCMalloc's minimal build has
#: the allocator alone; the full gperftools build adds the heap profiler)
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
#: set in a rank that has re-executed itself: what it found (a path) or why not
_MARK = "DOMAINTUNE_ALLOCATOR"


def find_tcmalloc() -> str | None:
    """The path of a TCMalloc library on this host, or None."""
    import ctypes.util

    dirs = [Path(d) for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += [Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                               "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                               "/usr/lib64", "/usr/lib", "/usr/local/lib")]  # fmt: skip
    dirs.append(Path(sys.prefix) / "lib")  # a conda environment's own
    for name in TCMALLOC_NAMES:
        for d in dirs:
            if (d / name).is_file():
                return str(d / name)
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return found  # a soname the dynamic loader finds on its own path


def preloaded() -> str | None:
    """The TCMalloc library this process runs with (mapped into it, where /proc tells;
    else named in ``LD_PRELOAD``), or None."""
    maps = Path("/proc/self/maps")
    if maps.is_file():
        for line in maps.read_text().splitlines():
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if "libtcmalloc" in Path(path).name:
                return path
        return None
    for entry in os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":"):
        if "tcmalloc" in Path(entry).name:
            return entry
    return None


def restart_with_tcmalloc(choice: str, module: str, argv: list[str]) -> None:
    """Re-execute this process, started as ``python -m module argv``, with TCMalloc preloaded
    when ``choice`` is ``auto``, the library is on this host and not yet loaded; otherwise
    (or when the process was not started that way) return. The process keeps its PID, so the
    launcher that started it still watches it."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if (
        choice != "auto"
        or preloaded()
        or os.environ.get(_MARK)
        or getattr(main, "name", None) != module
    ):
        return
    path = find_tcmalloc()
    if not path:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    env[_MARK] = path
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-u", "-m", module, *argv], env)


def describe(choice: str) -> str:
    """What this rank allocates with, for the run summary."""
    if loaded := preloaded():
        return f"tcmalloc ({loaded})"
    if choice == "system":
        return "system malloc (training.cpu_allocator: system)"
    return (
        "system malloc (TCMalloc not found: install libtcmalloc-minimal4 for ~10% faster CPU steps)"
    )
