"""The project's own errors.

Every error a user can cause (bad config, bad data, broken contract) is a ``DomainTuneError``
with a one-line message that names the file, the row or field, and the rule broken. They are
deterministic: retrying the task cannot fix them, so the Prefect wrappers never retry them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable


def shown(value: object, limit: int = 200, quote: bool = False) -> str:
    """``value`` (a user's text: a column name, a reference, a line of a file) as it may stand
    in a one-line message: itself where it is short, printable text; otherwise (empty, or
    with ``quote``) its repr, line breaks and control characters escaped; cut to ``limit``
    characters."""
    text = str(value)
    if quote or not text or not text.isprintable():
        text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_list(values: Iterable[object], most: int = 20, quote: bool = False) -> str:
    """Names (columns, keys) for a one-line message: the first ``most``, each ``shown``,
    comma-separated, and how many more there are."""
    values = list(values)
    text = ", ".join(shown(v, 60, quote) for v in values[:most])
    return text + (f" and {len(values) - most} more" if len(values) > most else "")


def utf8_text(data: bytes, where: str, rule: str, error: type[Exception]) -> str:
    """``data`` as UTF-8 text, else ``error`` in one line: ``where``, the line and the first
    bytes that are not UTF-8, and ``rule``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            f"{where}: line {line}: bytes {data[exc.start : exc.start + 4]!r} are not UTF-8; "
            f"rule: {rule}"
        ) from None


class DomainTuneError(Exception):
    """Base class of errors caused by the user's input, not by the machine."""

    #: Whether a retry could succeed (machine faults are retryable, bad input is not).
    retryable = False


class ConfigError(DomainTuneError):
    """The configuration is invalid: names the key and the allowed values."""


class DataError(DomainTuneError):
    """The input data cannot be read or mapped: names the file, row or column."""


class ContractViolation(DomainTuneError):
    """The data broke its data contract. Carries the path of the saved report."""

    def __init__(self, message: str, report_path: str | None = None, failures: list | None = None):
        super().__init__(message)
        self.report_path = report_path
        self.failures = failures or []


class ModelError(DomainTuneError):
    """The model or tokenizer cannot be found or does not fit the task."""


class PredictError(DomainTuneError):
    """A model reference, input or output that ``domaintune predict`` cannot use (one line,
    exit 2)."""


class ExportError(DomainTuneError):
    """An export of a model that cannot be made or does not match the model (parity): one
    line naming the model, the format and the rule broken."""


class TrainingFailed(Exception):
    """The training process(es) exited with an error. Retryable: the retry resumes."""

    retryable = True

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


class StoreError(Exception):
    """The store cannot be written (full disk, permissions). Not retried blindly."""


def disk_full(exc: OSError) -> bool:
    """A full disk or an exhausted quota (pyarrow's IO errors carry only the words)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)


def store_error(exc: OSError, where: str | os.PathLike) -> StoreError:
    """An OSError met while writing ``where`` as a one-line StoreError: a full disk and
    refused permissions named as such."""
    if disk_full(exc):
        return StoreError(f"store: no space left on device while writing {where}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"store: cannot write {where}: {exc.strerror} (check store.root)")
    return StoreError(f"store: cannot write {where}: {exc}")


class StoreAccessError(DomainTuneError):
    """The store refuses these credentials, or its bucket does not exist: retrying cannot
    help, so it is not retried (exit code 2, like a bad config)."""


class HostError(TrainingFailed):
    """A training host cannot be used: it does not answer, refuses the SSH key, lacks the
    environment or the shared folder, or the hostfile does not list enough hosts. Retryable:
    a host comes back, a scheduler rewrites its hostfile."""
