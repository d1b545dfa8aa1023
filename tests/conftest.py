from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's ./.msata: Prefect's home and the default MLflow
# store go to a throw-away folder, set before any test imports prefect or mlflow.
os.environ.setdefault("MSATA_HOME", tempfile.mkdtemp(prefix="msata-test-home-"))
# Nor a store the user's shell points MLflow at: tests that want a store of their own set it.
for _name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
    os.environ.pop(_name, None)
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


@pytest.fixture(scope="session", autouse=True)
def _log_mel_compiled() -> None:
    """librosa's numba kernels compile on the first ``log_mel`` call of a process (about 25 s
    with a cold numba cache, 7 s with a warm one): paid here, once, in the setup of the
    session's first test, instead of inside whichever fast test happens to run first
    (it was tests/features/test_audio.py::test_frame_count_and_times). Sessions whose test
    modules never import features.audio (the CLI tests alone, say) skip it."""
    if "features.audio" not in sys.modules:
        return
    import numpy as np

    from features.audio import log_mel
    from features.config import AudioConfig

    config = AudioConfig()
    log_mel(np.zeros(config.sample_rate, np.float32), config)  # log_mel casts to float32: one signature to compile


# MLflow's process-wide URIs: module globals that mlflow.set_tracking_uri / set_registry_uri set,
# and export to the environment (MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI) for subprocesses.
_MLFLOW_URI_GLOBALS = (
    ("mlflow.tracking._tracking_service.utils", "_tracking_uri", "set_tracking_uri"),
    ("mlflow.tracking._model_registry.utils", "_registry_uri", "set_registry_uri"),
)


def _loaded(module: str) -> bool:
    return sys.modules.get(module) is not None  # None: a test hides the module (an import of it fails)


@pytest.fixture(autouse=True)
def _mlflow_uris_restored():
    """Each test starts from the MLflow tracking and registry URIs (and MLFLOW_* variables) the
    previous one started from. A test (or the code it runs) that points MLflow at its own store
    leaves it pointed there otherwise: the registry URI of the train-flow test was still set in
    the ablation test that followed it, whose ``MlflowClient`` then searched the wrong registry.
    Restored after monkeypatch's own undo, whatever the test's fixtures did."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    saved = {module: getattr(sys.modules[module], name) for module, name, _ in _MLFLOW_URI_GLOBALS if _loaded(module)}
    yield
    if _loaded("mlflow"):
        import mlflow

        for module, name, setter in _MLFLOW_URI_GLOBALS:
            if _loaded(module) and getattr(sys.modules[module], name) != saved.get(module):
                getattr(mlflow, setter)(saved.get(module))  # None (not set before, or not imported yet) unsets it
    for name in [k for k in os.environ if k.startswith("MLFLOW_") and k not in env]:
        del os.environ[name]
    os.environ.update(env)
