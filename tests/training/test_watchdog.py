"""The rank watchdog (domaintune.training.worker.watch_task_process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

RANK = """
import time
from domaintune.training.worker import watch_task_process
watch_task_process(interval=0.2)
time.sleep(60)
"""


def test_a_rank_ends_when_its_task_is_sigkilled_even_with_the_tasks_pipe_gone():
    """The rank's stdout is a pipe to the task process: when that process is SIGKILLed the
    pipe has no reader, and the watchdog's last words must not keep the rank alive (seen: a
    SIGKILLed run left its rank training 21-45 s on a 1-second watchdog)."""
    task = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    read, write = os.pipe()
    env = {
        **os.environ,
        "DOMAINTUNE_TASK_PID": str(task.pid),
        "DOMAINTUNE_TASK_HOST": socket.gethostname(),
    }
    rank = subprocess.Popen([sys.executable, "-c", RANK], stdout=write, env=env)
    os.close(write)
    try:
        time.sleep(3)  # imported and watching
        assert rank.poll() is None
        os.close(read)  # the task's end of the pipe is gone with it
        task.kill()
        task.wait()
        assert rank.wait(timeout=10) == 4
    finally:
        for p in (rank, task):
            if p.poll() is None:
                p.kill()
                p.wait()
