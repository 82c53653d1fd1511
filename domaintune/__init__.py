"""domaintune: keep pretrained language models fine-tuned for your own domains."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("domaintune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

# credentials never reach a log line, whichever logger writes it (Prefect's included)
from domaintune.redaction import install_log_redaction  # noqa: E402

install_log_redaction()
