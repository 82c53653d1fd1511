"""Run as ``python -m tests.training.allocator_probe CHOICE``: prints its PID, restarts with
TCMalloc the way a CPU training rank does, and prints its PID and allocator again."""

import os
import sys

from domaintune.training.allocator import describe, restart_with_tcmalloc

choice = sys.argv[1]
print("before", os.getpid(), flush=True)
restart_with_tcmalloc(choice, "tests.training.allocator_probe", sys.argv[1:])
print("after", os.getpid(), describe(choice), flush=True)
