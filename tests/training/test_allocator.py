"""CPU training ranks allocate with TCMalloc where it is installed (training.cpu_allocator)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from domaintune.training.allocator import find_tcmalloc

ROOT = Path(__file__).resolve().parents[2]


def probe(choice: str, **env: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.training.allocator_probe", choice],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line.split(" ", 2) for line in out.splitlines()]


@pytest.mark.skipif(find_tcmalloc() is None, reason="TCMalloc is not installed (make install)")
def test_a_rank_restarts_itself_with_tcmalloc_and_keeps_its_pid():
    lines = probe("auto")
    # one restart: the module ran twice, in the same process (its launcher watches that PID)
    assert [line[0] for line in lines] == ["before", "before", "after"]
    assert len({line[1] for line in lines}) == 1
    allocator = lines[-1][2]
    assert allocator.startswith("tcmalloc (") and "libtcmalloc" in allocator


def test_the_system_allocator_when_asked_or_when_tcmalloc_is_missing():
    (_, pid, *_), (_, pid_after, allocator) = probe("system")
    assert pid == pid_after and allocator.startswith("system malloc (training.cpu_allocator")
    # a rank that runs without it (not found, or its restart already tried) says how to get it
    lines = probe("auto", DOMAINTUNE_ALLOCATOR="tried")
    assert lines[-1][2].startswith("system malloc (TCMalloc not found: install libtcmalloc")
