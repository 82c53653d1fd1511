"""The training's process supervisor: the finetune stage decides what to train and keeps
the result; this runs it. It starts the DeepSpeed launcher in its own process group, streams
the ranks' output into ``train.log`` (secrets redacted) and the log, turns the ranks'
progress events into Prefect progress, tracking and the tuner's observer, stops the whole
group on cancellation, and names a failure in one line (which rank failed first, the last
error it wrote, a fatal-signal dump in words).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from domaintune.errors import TrainingFailed
from domaintune.redaction import redact
from domaintune.training.events import PROGRESS_PREFIX

log = logging.getLogger("domaintune.tasks.finetune")


class MetricsSink(Protocol):
    """Where the ranks' logged metrics go besides the log (``tracking.TrainingTracker``:
    TensorBoard, MLflow)."""

    def log(self, event: dict[str, Any]) -> None: ...


#: lines of the ranks' output a failure carries
_TAIL_LINES = 60


def training_failed(
    rc: int | None,
    attempt: int,
    tail: list[str],
    first: str | None,
    fault: str,
    train_log: Path,
) -> TrainingFailed:
    """The one-line error for a failed launch: the exit code, which rank failed first and the
    last error a rank wrote; the log's tail travels with it."""
    cause = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), "")
    if first:  # which rank went first says more than the errors of those it took along
        said = cause or _last_rank_words(tail)  # an abort says "Assertion ... failed"
        said = f"{said.strip()} ({fault})" if said and fault else said or fault
        cause = f"{first}; last error: {said.strip()}" if said else first
    return TrainingFailed(
        f"finetune: training exited with code {rc} (attempt {attempt}): "
        f"{cause.strip()[:400]}; a retry resumes from the newest checkpoint; full log: "
        f"{train_log}",
        log_tail="\n".join(tail),
    )


def run_launcher(
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    cwd: Path | None = None,
    tracker: MetricsSink | None = None,
    observer: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[int, list[str], str | None, str]:
    """Run the launcher, forward its output; return (exit code, last lines, the rank that
    ended with an error first (``root_failure``), in words, and the first fatal-signal dump,
    in words). Fault dumps stay in train.log, not in the tail: their frames would bury the
    error lines."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    progress = PrefectProgress()
    dumps = FaultDumps()
    failures: list[str] = []
    with open(log_path, "a", encoding="utf-8") as logf:
        logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # its own process group: killed as one on cancellation
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = redact(line)
                logf.write(line)
                logf.flush()  # train.log is current for whoever tails it
                line = line.rstrip("\n")
                if dumps.feed(line):
                    continue
                tail.append(line)
                failure = rank_failure(line)
                if failure:
                    failures.append(failure)
                _forward(line, progress, tracker, observer)
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
    return rc, list(tail), root_failure(failures), dumps.summary


_RANK_EXIT = re.compile(
    r"^(?:(?P<host>[^\s:]+): )?.*launch\.py.*exits with return code = (?P<code>-?\d+)"
)


def _last_rank_words(tail: list[str]) -> str:
    """The last line the ranks themselves printed before the launcher reported one of them
    gone (not the launcher's own log lines, not progress events)."""
    for line in reversed(tail):
        body = _rank_body(line)
        if body.strip() and not _LAUNCHER_LOG.match(body) and PROGRESS_PREFIX not in body:
            return body
    return ""


def _rank_body(line: str) -> str:
    """A line without the ``host: `` prefix pdsh puts before a remote rank's output."""
    return line.partition(": ")[2] if _HOST_PREFIX.match(line) else line


_HOST_PREFIX = re.compile(r"^[^\s:]+: ")
_LAUNCHER_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[[A-Z]+\] ")
_DUMP_BODY = re.compile(
    r"^(?:(?:Current thread|Thread) 0x[0-9a-fA-F]+ |  File \"|  <no Python frame>|  \.\.\.|"
    r"Extension modules: |Python runtime state: |\s*$)"
)
_DUMP_FRAME = re.compile(r'^  File "(?:.*/)?(?P<file>[^/"]+)", line (?P<line>\d+) in (?P<func>\S+)')


class FaultDumps:
    """Reads the dumps Python's faulthandler prints when a rank dies by a signal (the worker
    enables it), line by line: ``Fatal Python error: Aborted``, then every thread's stack.
    ``summary`` names the first one and where its crashing thread was, e.g. "Fatal Python
    error: Aborted, current thread in end_distributed (worker.py:490)"."""

    def __init__(self) -> None:
        self.summary = ""
        self._in_dump = False
        self._wanted = ""  # "thread": the crashing thread's header; "frame": its innermost frame

    def feed(self, line: str) -> bool:
        """Take one line of output; True if it belongs to a dump."""
        body = _rank_body(line)
        if body.startswith("Fatal Python error: "):
            if not self.summary:
                self.summary = body.strip()
                self._wanted = "thread"
            self._in_dump = True
            return True
        if not (self._in_dump and _DUMP_BODY.match(body)):
            self._in_dump = False
            return False
        if self._wanted == "thread" and body.startswith("Current thread "):
            self._wanted = "frame"
        elif self._wanted == "frame":
            frame = _DUMP_FRAME.match(body)
            if frame:
                self.summary += (
                    f", current thread in {frame['func']} ({frame['file']}:{frame['line']})"
                )
            elif "<no Python frame>" in body:
                self.summary += ", current thread outside Python code"
            self._wanted = ""
        return True


def rank_failure(line: str) -> str | None:
    """DeepSpeed's per-host launcher reporting a rank that ended with an error, in words
    (``the rank on host 10.0.0.2 was killed by SIGKILL``); None for any other line."""
    m = _RANK_EXIT.match(line)
    if not m or int(m["code"]) == 0:
        return None
    code = int(m["code"])
    where = f"the rank on host {m['host']}" if m["host"] else "a rank"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{where} was killed by {name}"
    return f"{where} exited with code {code}"


def root_failure(failures: list[str]) -> str | None:
    """Of the ranks the launchers reported ending with an error, the one that most likely
    went first. Not simply the first report: a rank killed on another host is reported over
    SSH, while the ranks that lose it fail at once with a connection reset (exit code 1) on
    hosts whose reports may arrive sooner. So a rank killed by a signal (other than the
    SIGTERM / SIGINT launchers send when they stop) comes before one that exited with an
    error, which comes before one stopped by SIGTERM; the order of reports breaks ties."""

    def weight(failure: str) -> int:
        if failure.endswith(("killed by SIGTERM", "killed by SIGINT")):
            return 2
        return 0 if " killed by " in failure else 1

    return min(failures, key=weight) if failures else None


class PrefectProgress:
    """A Prefect progress artifact for the training, updated as steps complete (only when
    running inside a Prefect task run; never fails the training)."""

    def __init__(self) -> None:
        self.artifact_id: Any = None
        self.last = -1.0

    def update(self, step: int, max_steps: int, **latest: float) -> None:
        if max_steps <= 0:
            return
        percent = round(100.0 * min(step, max_steps) / max_steps, 1)
        if percent == self.last and not latest:
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is None:
                return
            description = progress_description(step, max_steps, **latest)
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, description=description)
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
            self.last = percent
        except Exception as exc:  # the UI's progress bar is not worth a failed run
            log.debug("finetune: progress artifact not updated: %s", exc)


def progress_description(step: int, max_steps: int, **latest: float) -> str:
    """ "Training: step 40 of 80 · loss 0.5312 · 1,234 tokens/s"."""
    parts = [f"Training: step {step} of {max_steps}"]
    if latest.get("loss") is not None:
        parts.append(f"loss {latest['loss']:.4g}")
    if latest.get("tokens_per_second"):
        parts.append(f"{latest['tokens_per_second']:,.0f} tokens/s")
    if latest.get("samples_per_second"):
        parts.append(f"{latest['samples_per_second']:,.1f} samples/s")
    return " · ".join(parts)


def _forward(
    line: str,
    progress: PrefectProgress | None = None,
    tracker: MetricsSink | None = None,
    observer: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    host, sep, rest = line.partition(": ")
    if sep and " " not in host and rest.startswith(PROGRESS_PREFIX):
        line = rest  # pdsh puts "<host>: " before each line of the ranks on several hosts
    if line.startswith(PROGRESS_PREFIX):
        try:
            event = json.loads(line[len(PROGRESS_PREFIX) :])
        except ValueError:
            log.info("train: %s", line)
            return
        kind = event.pop("event", "")
        if progress is not None and kind in ("train_begin", "log", "done"):
            step = event.get("step", event.get("start_step", event.get("global_step", 0)))
            total = event.get("max_steps") or (event.get("global_step") if kind == "done" else 0)
            latest = {
                k: event[k]
                for k in ("loss", "tokens_per_second", "samples_per_second")
                if kind == "log" and isinstance(event.get(k), int | float)
            }
            progress.update(int(step or 0), int(total or 0), **latest)
        if kind == "log":
            if tracker is not None:  # tracking.report_to: TensorBoard, MLflow
                tracker.log(event)
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in event.items()}
            log.info("train: %s", " ".join(f"{k}={v}" for k, v in shown.items()))
            if observer is not None:  # may raise to stop the training (tune's pruning)
                observer(dict(event))
        else:
            log.info("train %s: %s", kind, json.dumps(event, default=str))
    elif "Traceback" in line or "Error" in line or "error:" in line:
        log.warning("train: %s", line)
    else:
        log.debug("train: %s", line)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
