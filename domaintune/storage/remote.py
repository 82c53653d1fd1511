"""How domaintune talks to an object store: its client's retry policy, and its failures as one
line.

**Retries.** A request that meets a transient fault (connection refused, reset or cut
mid-upload, a read timeout, ``500``/``502``/``503``/``504``, ``SlowDown`` and the other
throttling codes, ``RequestTimeout``) is retried by **botocore**, the client under s3fs, in
its ``standard`` retry mode: up to ``total_max_attempts`` attempts, waiting ``rand(0, 1) *
min(2 ** n, 20)`` seconds before retry ``n`` (at most 1 + 2 + 4 + 8 = 15 s for 5 attempts),
and within a retry quota per client so that a store that is down is not hammered. The
layers above add little and are left as they are: s3fs retries a whole call once more (up
to 5 times, 0.1-0.8 s apart) when its answer's body is cut while being read, or when
botocore gave up on ``SlowDown``; aiohttp resends a request once when a pooled connection
turns out to be closed. domaintune sets this as a default (``store.storage_options`` may
set ``config_kwargs: {retries: ...}`` itself) and does not retry requests on its own: what
it adds is making every write safe to retry (objects are whole or absent; a create-if-absent
whose answer was lost is recognised as its own by its content) and saying, when the retries
are spent, what failed in one line.
"""

from __future__ import annotations

from typing import Any

from domaintune.errors import StoreAccessError, StoreError
from domaintune.redaction import redact

#: botocore's retry settings for S3 (``config_kwargs["retries"]``), unless the user set some
S3_RETRIES: dict[str, Any] = {"mode": "standard", "total_max_attempts": 5}


def with_retry_defaults(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec storage options for ``url`` with domaintune's retry policy where the options
    set none (S3 only: other file systems keep their own defaults)."""
    options = dict(options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", dict(S3_RETRIES))
        options["config_kwargs"] = config
    return options


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (its type's name if it has none), secrets redacted."""
    text = str(exc).strip() or type(exc).__name__
    return redact(text.splitlines()[0])


def describe_remote_error(exc: BaseException, what: str) -> Exception:
    """An object store's failure as one line naming what failed and why: refused
    credentials (``StoreAccessError``, not retried) or a store that cannot be reached
    (``StoreError``, which a retry may fix). Never a secret."""
    if isinstance(exc, StoreError | StoreAccessError):
        return exc  # type: ignore[return-value]
    name = type(exc).__name__
    text = first_line(exc)
    if isinstance(exc, PermissionError) or any(
        s in text
        for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")
    ):
        return StoreAccessError(
            f"{what}: access denied: {text} (check the credentials: store.storage_options, "
            "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment of the run)"
        )
    if "connect" in name.lower() or "connect" in text.lower() or "timeout" in name.lower():
        return StoreError(f"{what}: cannot reach the object store: {text}")
    return StoreError(f"{what}: {name}: {text}")
