"""Project-local defaults for Prefect and MLflow, applied before either is imported.

Everything msata writes by default lives under ``MSATA_HOME`` (``./.msata``):
Prefect's home (its temporary API's SQLite database), the MLflow SQLite store and
artifacts, demo data. Users override any of it with the tools' own variables
(``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``...), which always win.
"""

from __future__ import annotations

import os
from pathlib import Path

from storage.home import msata_home  # one definition, shared with modeling

__all__ = ["configure_cli_logging", "configure_environment", "flush_api_logs", "msata_home"]


def configure_cli_logging(verbose: bool = False) -> None:
    """Logging for the ``msata`` commands, set before Prefect is imported.

    Flow and task runs send their INFO lines to the Prefect API (the run's log in the
    UI), whether the API is a running server or msata's temporary one. The terminal
    shows msata's own output only: Prefect's console handler is raised to CRITICAL,
    unless ``--verbose`` asks for Prefect's lines there too. A user's own
    PREFECT_LOGGING_* variables win.
    """
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "CRITICAL")


def configure_environment() -> Path:
    """Set project-local defaults (never overriding the user's) and return MSATA_HOME."""
    home = msata_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MSATA_HOME", str(home))
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    # No telemetry: these machines may have no network, and users did not ask for it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault(
        "PREFECT_LOGGING_LEVEL", "WARNING"
    )  # library use and tests; the CLI sends INFO to the API (configure_cli_logging)
    # The temporary API server starts in a subprocess; on a busy 2-core machine it needs more than the default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    return home


def flush_api_logs(timeout_s: float = 10.0) -> None:
    """Send the log lines still queued for the Prefect API (call before a temporary API server stops)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
