"""Progress of long loops that are not training (generation, scoring, predict): a bar on a
terminal, a log line every 10% or every 30 seconds otherwise, and a Prefect progress
artifact when the loop runs inside a Prefect task run. None of it can fail the work."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

#: a plain log line at least this often (seconds), whatever the share done
LINE_EVERY_SECONDS = 30.0


class Progress:
    """``advance(rows, tokens=0)`` after each batch, ``close()`` at the end. ``what``
    names the loop in its lines ("evaluate: base model generates"), ``unit`` its rows."""

    def __init__(self, total: int, what: str, unit: str = "rows", logger: Any = None):
        self.total, self.what, self.unit = total, what, unit
        self.log = logger or log
        self.done = self.tokens = 0
        self.t0 = self.last_line = time.time()
        self.next_tenth = 1  # the next line at this many tenths done
        self.logged = -1  # ``done`` at the last log line
        self.bar = None
        self.artifact_id: Any = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=what, file=sys.stderr)

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def describe(self) -> str:
        """ "evaluate: base model generates: 48 of 200 answers (24%), 1,234 tokens, 31.2
        tokens/s, 40 s, about 2 min left"."""
        seconds = max(self.seconds, 1e-9)
        parts = [f"{self.done} of {self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens, {self.tokens / seconds:,.1f} tokens/s")
        parts.append(f"{seconds:.0f} s")
        if 0 < self.done < self.total:
            left = seconds * (self.total - self.done) / self.done
            parts.append(
                f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left"
            )
        return f"{self.what}: " + ", ".join(parts)

    def advance(self, rows: int, tokens: int = 0) -> None:
        self.done += rows
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(rows)
            if tokens:
                self.bar.set_postfix(tokens_per_s=f"{self.tokens / max(self.seconds, 1e-9):.1f}")
        share = self.done / self.total if self.total else 1.0
        tenths = 10 * self.done // self.total if self.total else 10
        now = time.time()
        if tenths >= self.next_tenth or now - self.last_line >= LINE_EVERY_SECONDS:
            if self.bar is None:
                self.log.info("%s", self.describe())
                self.logged = self.done
            self.last_line = now
            self.next_tenth = max(self.next_tenth, tenths + 1)
            self._artifact(share)

    def close(self) -> None:
        """The bar closed; the final line logged unless the last line was final."""
        if self.bar is not None:
            self.bar.close()
        if self.logged != self.done:
            self.log.info("%s", self.describe())
        self._artifact(1.0)

    def _artifact(self, share: float) -> None:
        """The Prefect UI's progress bar of the running task (only inside a task run)."""
        try:
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is None:
                return
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            percent = round(100.0 * min(share, 1.0), 1)
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, description=self.describe())
            else:
                update_progress_artifact(self.artifact_id, percent, description=self.describe())
        except Exception as exc:  # a progress bar is not worth a failed run
            log.debug("progress artifact not updated: %s", exc)
