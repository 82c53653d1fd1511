"""Secrets never leave the process in what domaintune writes or logs.

``redact`` masks credentials in text: user:password in URLs (``s3://KEY:SECRET@bucket``),
token-like query parameters (``?token=...``, ``sig=``, ``X-Amz-Signature=``), bearer headers,
well-known token shapes (Hugging Face ``hf_...``, AWS access key ids, GitHub and Slack
tokens), and the value of every environment variable whose name says it is a secret
(``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``*_PASSWORD`` ...).

``install_log_redaction`` makes every log record pass through it (Prefect's task logs
included, as they are log records too); the flow applies ``redact_obj`` to what it writes:
run summaries, artifacts, reports, the registry's config and lineage.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"

_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|AUTH)", re.I
)
#: variables whose names match but hold no secret (paths, flags)
_NOT_SECRET = {"HF_HUB_DISABLE_IMPLICIT_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"}

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # scheme://user:password@host -> scheme://***@host
    # (a URL whose password is already masked, user:***@host, keeps its user)
    (
        re.compile(r"(?P<s>\b[a-zA-Z][\w+.-]*:///?)[^/\s:@'\"`]+:(?!\*\*\*@)[^/\s@'\"`]+@"),
        rf"\g<s>{MASK}@",
    ),
    # ... and the same after a file system stripped the scheme (/user:password@bucket/key)
    (re.compile(r"(?<=[/\s`'\"(])[^/\s:@'\"`]+:(?!\*\*\*@)[^/\s@'\"`]+@(?=[\w.-])"), f"{MASK}@"),
    (
        re.compile(
            r"(?i)(?P<k>\b(?:access_?token|token|api[_-]?key|apikey|secret|password|passwd|pwd|"
            r"sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|sas|"
            r"client_secret)=)[^&\s'\"]+"
        ),
        rf"\g<k>{MASK}",
    ),
    (re.compile(r"(?i)(?P<k>\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\g<k>{MASK}"),
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), f"hf_{MASK}"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), f"AKIA{MASK}"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), f"gh_{MASK}"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), f"xox-{MASK}"),
]

_env_cache: tuple[tuple[tuple[str, str], ...], list[str]] | None = None
#: values read through ``${env:NAME}`` references (``domaintune.credentials``)
_registered: set[str] = set()


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says that it holds a secret."""
    return bool(_SECRET_NAME.search(name)) and name not in _NOT_SECRET


def register_secret(value: str) -> None:
    """Mask ``value`` from now on (6+ characters: shorter ones would mask ordinary words)."""
    global _env_cache
    if value and len(value) >= 6 and value not in _registered:
        _registered.add(value)
        _env_cache = None


def secret_values() -> list[str]:
    """Values of secret-named environment variables (8+ characters) and of registered
    secrets, longest first."""
    global _env_cache
    items = tuple(
        sorted((k, v) for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8)
    )
    if _env_cache is None or _env_cache[0] != items:
        values = {v for _, v in items} | _registered
        _env_cache = (items, sorted(values, key=len, reverse=True))
    return _env_cache[1]


def redact(text: str) -> str:
    if not text:
        return text
    for value in secret_values():
        if value in text:
            text = text.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_obj(obj: Any) -> Any:
    """``redact`` over every string of a JSON-like structure (keys included)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


_installed = False


def install_log_redaction() -> None:
    """Every log record, from any logger, is redacted when it is created (idempotent)."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's own business
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:  # tracebacks quote messages and URLs
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
