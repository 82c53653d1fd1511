"""Stopping a run as a scheduler, `timeout` or Ctrl-C stops it: everything it started ends
with it (training ranks, the temporary Prefect server, helper processes), checked on the
process tree afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import write_csv
from tests.test_cli import write_config


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


@pytest.mark.slow
def test_a_stopped_run_leaves_no_process_behind(tmp_path, rows, make_config):
    """Two runs at once (one test, one wait for training to start): one stopped by SIGTERM,
    as `timeout`, a scheduler or `kill` stops it (the signal reaches the command alone), one
    by Ctrl-C in a terminal (SIGINT to the whole foreground process group)."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # each CLI starts Prefect's temporary server
    runs = {}
    try:
        for how in ("sigterm", "ctrl-c"):
            d = tmp_path / how
            d.mkdir()
            src = write_csv(d / "d.csv", rows(30))
            config = write_config(
                d / "c.yaml",
                make_config(
                    src,
                    training={"max_steps": 100_000, "epochs": 1000},
                    store={"root": str(d / "store")},
                ),
            )
            log = open(d / "cli.log", "wb")  # noqa: SIM115 - closed below
            cli = subprocess.Popen(
                [sys.executable, "-m", "domaintune.cli", "run", config],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, as a shell's foreground job
            )
            runs[how] = (cli, log, d / "cli.log", {})
        deadline = time.monotonic() + 300
        waiting = set(runs)
        while waiting and time.monotonic() < deadline:
            for how in list(waiting):
                cli, _, path, seen = runs[how]
                for p in _descendants(cli.pid):
                    seen.setdefault(p.pid, p)
                cmds = [_cmd(p) for p in seen.values() if p.is_running()]
                if any("domaintune.training.worker" in c for c in cmds) and any(
                    "uvicorn" in c for c in cmds
                ):
                    waiting.discard(how)
                assert cli.poll() is None, path.read_text()[-3000:]
            time.sleep(0.3)
        assert not waiting, f"never reached training: {waiting}"
        time.sleep(2)  # a few steps in
        for how, (cli, _, _, seen) in runs.items():
            for p in _descendants(cli.pid):
                seen.setdefault(p.pid, p)
            if how == "sigterm":
                cli.send_signal(signal.SIGTERM)
            else:
                os.killpg(cli.pid, signal.SIGINT)
        for how, (cli, _, path, seen) in runs.items():
            code = cli.wait(timeout=60)
            assert code == (143 if how == "sigterm" else 130), (how, code)
            gone, alive = psutil.wait_procs(list(seen.values()), timeout=30)
            assert not alive, f"{how}: left running: " + "; ".join(
                _cmd(p) or str(p.pid) for p in alive
            )
            out = path.read_text(errors="replace")
            assert "stopped by" in out, out[-3000:]
    finally:
        for cli, log, _, seen in runs.values():
            if cli.poll() is None:
                cli.kill()
            for p in seen.values():
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            log.close()
