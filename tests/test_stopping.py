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
@pytest.mark.parametrize(
    "how",
    [
        "sigterm",  # `timeout`, a scheduler, `kill`: the signal reaches the command alone
        "ctrl-c",  # a terminal: SIGINT to the whole foreground process group
    ],
)
def test_a_stopped_run_leaves_no_process_behind(tmp_path, rows, make_config, how):
    src = write_csv(tmp_path / "d.csv", rows(30))
    config = write_config(
        tmp_path / "c.yaml",
        make_config(src, training={"max_steps": 100_000, "epochs": 1000}),
    )
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the CLI starts Prefect's temporary server
    log = open(tmp_path / "cli.log", "wb")
    cli = subprocess.Popen(
        [sys.executable, "-m", "domaintune.cli", "run", config],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group, as a shell's foreground job
    )
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for p in _descendants(cli.pid):
                seen.setdefault(p.pid, p)
            cmds = [_cmd(p) for p in seen.values() if p.is_running()]
            training = any("domaintune.training.worker" in c for c in cmds)
            server = any("uvicorn" in c for c in cmds)
            if training and server:
                break
            assert cli.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
            time.sleep(0.3)
        else:
            pytest.fail("the run never reached training: " + str(cmds))
        time.sleep(2)  # a few steps in
        for p in _descendants(cli.pid):
            seen.setdefault(p.pid, p)
        if how == "sigterm":
            cli.send_signal(signal.SIGTERM)
        else:
            os.killpg(cli.pid, signal.SIGINT)
        code = cli.wait(timeout=60)
        assert code != 0, "a stopped run must not report success"
        gone, alive = psutil.wait_procs(list(seen.values()), timeout=30)
        assert not alive, "left running: " + "; ".join(_cmd(p) or str(p.pid) for p in alive)
        out = (tmp_path / "cli.log").read_text(errors="replace")
        assert "stopped by" in out, out[-3000:]
    finally:
        if cli.poll() is None:
            cli.kill()
        for p in seen.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
