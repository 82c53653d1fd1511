"""Process environment defaults, applied before Prefect, GX or transformers are imported.

Prefect reads its settings (such as the extra loggers it forwards to the API) when it is
first imported, so this module must not import Prefect itself.
"""

from __future__ import annotations

import logging
import os


def configure_environment() -> None:
    """Defaults for a local run; anything the user set wins."""
    extra = os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "")
    if "domaintune" not in extra.split(","):
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(
            x for x in (extra, "domaintune") if x
        )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # stage functions also run outside flows (domaintune validate, benches): no warnings then
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # Prefect's local server gets 20 s to start by default; a busy 2-core machine (training
    # in the background, CI) can need more, and a timeout there fails the whole run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("great_expectations", "transformers", "datasets", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("domaintune").setLevel(logging.INFO)
