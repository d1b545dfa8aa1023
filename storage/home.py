"""Where msata keeps what it writes by default: ``MSATA_HOME`` (default ``./.msata``).

On the ground of the house so that modeling (MLflow store, run directories) and flows (Prefect
home, demo data) read one definition without modeling importing flows.
"""

from __future__ import annotations

import os
from pathlib import Path


def msata_home() -> Path:
    return Path(os.environ.get("MSATA_HOME", Path.cwd() / ".msata")).resolve()
