"""Credentials by reference: ``${env:NAME}`` in storage options.

A config's ``data.storage_options`` and ``store.storage_options`` are passed to fsspec when
a file system is opened (``key``, ``secret``, ``token``, ``endpoint_url``, ...). A value
written as ``${env:NAME}`` is read from the environment of the process that opens the
file system, at that moment: the secret itself never enters the config, Prefect's flow-run
parameters (which Prefect stores as given), the cache keys or the logs, and every value read
this way is added to what ``redaction.redact`` masks.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from domaintune.errors import ConfigError
from domaintune.redaction import register_secret

log = logging.getLogger(__name__)

ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
#: option names whose literal values are credentials
_SECRET_OPTION = re.compile(r"(secret|password|passwd|token|key|credential|sas|signature)", re.I)
_NOT_SECRET_OPTION = {"key_prefix", "keyfile", "key_file", "sse_kms_key_id"}


def resolve_env_refs(options: dict[str, Any] | None, field: str) -> dict[str, Any]:
    """A copy of ``options`` with every ``${env:NAME}`` replaced from the environment."""

    def one(value: Any, where: str) -> Any:
        if isinstance(value, str):

            def sub(m: re.Match[str]) -> str:
                name = m.group(1)
                if name not in os.environ:
                    raise ConfigError(
                        f"{where}: environment variable {name} is not set (referenced as "
                        f"${{env:{name}}}); rule: a referenced credential must be in the "
                        "environment of the process that reads the data (the Prefect worker)"
                    )
                register_secret(os.environ[name])
                return os.environ[name]

            return ENV_REF.sub(sub, value)
        if isinstance(value, dict):
            return {k: one(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [one(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    return {k: one(v, f"{field}.{k}") for k, v in (options or {}).items()}


def literal_secrets(options: dict[str, Any] | None, field: str) -> list[str]:
    """Fields of ``options`` that hold a credential written out instead of referenced."""
    found: list[str] = []
    for k, v in (options or {}).items():
        where = f"{field}.{k}"
        if isinstance(v, dict):
            found += literal_secrets(v, where)
        elif (
            isinstance(v, str)
            and v
            and _SECRET_OPTION.search(k)
            and k not in _NOT_SECRET_OPTION
            and not ENV_REF.fullmatch(v)
        ):
            found.append(where)
    return found
