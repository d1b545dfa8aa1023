from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's ./.msata: Prefect's home and the default MLflow
# store go to a throw-away folder, set before any test imports prefect or mlflow.
os.environ.setdefault("MSATA_HOME", tempfile.mkdtemp(prefix="msata-test-home-"))
from flows.settings import configure_environment  # noqa: E402

configure_environment()

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MSATA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real development media (never in the repo); tests using it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real development data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session: starting one per flow costs ~20 s here."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield
