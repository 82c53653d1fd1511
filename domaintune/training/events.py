"""The ranks' progress lines: rank 0 prints ``DOMAINTUNE {json}`` lines on its output, which
the finetune task's supervisor (``training/supervisor.py``) reads from the launcher's output
and forwards to Prefect and the trackers."""

from __future__ import annotations

import json
import os
from typing import Any

PROGRESS_PREFIX = "DOMAINTUNE "


def rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0"))


def emit(event: str, **fields: Any) -> None:
    """One progress line for the parent (rank 0 only)."""
    if rank() == 0:
        print(PROGRESS_PREFIX + json.dumps({"event": event, **fields}, default=float), flush=True)
