"""Processes of several runs on one host share its cores (domaintune.cpu_share): a slot per
CPU-heavy process, threads = cores // slots, a dead process's slot freed by the kernel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from domaintune import cpu_share

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from domaintune.cpu_share import Slot
    slot = Slot("holder", Path(sys.argv[1]), cores=8)
    print("held", flush=True)
    time.sleep(120)
    """
)


def _holder(folder) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_threads_follow_the_processes_holding_slots(tmp_path):
    mine = cpu_share.Slot("test", tmp_path, cores=8)
    assert (mine.slots(), mine.share()) == (1, 8)
    others = [_holder(tmp_path), _holder(tmp_path), _holder(tmp_path)]
    try:
        assert (mine.slots(), mine.share()) == (4, 2)
        others[0].send_signal(signal.SIGKILL)  # a killed process frees its slot
        others[0].wait()
        assert (mine.slots(), mine.share()) == (3, 2)
        assert len(list(tmp_path.glob("*.slot"))) == 3, "the dead one's file is removed"
        for p in others[1:]:
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert mine.share() == 8
    finally:
        for p in others:
            p.kill()
            p.wait()
        mine.close()
    assert not list(tmp_path.glob("*.slot"))


def test_a_slot_sets_torch_threads_and_gives_them_back(tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINTUNE_CPU_SHARE_DIR", str(tmp_path))
    before = torch.get_num_threads()
    cores = cpu_share.host_cores()
    other = _holder(tmp_path)
    try:
        with cpu_share.cpu_slot("scoring") as slot:
            assert slot is not None
            assert torch.get_num_threads() == max(1, cores // 2)
            other.kill()
            other.wait()
            slot._checked = 0.0  # as if a second had passed
            cpu_share.refresh()
            assert torch.get_num_threads() == cores
        assert torch.get_num_threads() == before
    finally:
        other.kill()
        other.wait()
    monkeypatch.setenv("DOMAINTUNE_CPU_SHARE", "0")
    with cpu_share.cpu_slot("scoring") as slot:
        assert slot is None and torch.get_num_threads() == before


def test_a_training_rank_holds_a_slot_while_it_trains(tmp_path):
    """Seen from outside: a process that holds a slot counts; one that ended does not."""
    code = textwrap.dedent(
        """
        import time
        from domaintune.cpu_share import cpu_slot
        with cpu_slot("rank"):
            print("in", flush=True)
            time.sleep(2)
        print("out", flush=True)
        time.sleep(30)
        """
    )
    env = {**os.environ, "DOMAINTUNE_CPU_SHARE_DIR": str(tmp_path)}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "in"
        probe = cpu_share.Slot("probe", tmp_path, cores=4)
        assert probe.slots() == 2
        assert p.stdout.readline().strip() == "out"
        time.sleep(0.1)
        assert probe.slots() == 1
        probe.close()
    finally:
        p.kill()
        p.wait()
