"""MLflow tracking and registry against a real SQLite store: the champion rule's error handling."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from training_fixtures import tiny_meta


@pytest.fixture()
def mlflow_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import mlflow

    from modeling import tracking

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    tracking.configure_tracking()
    yield db
    monkeypatch.undo()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_registry_uri(tracking.tracking_uri())


def tiny_checkpoint(path: Path) -> Path:
    from modeling.checkpoint import save_checkpoint
    from modeling.encoder import MsataConfig, MsataModel

    meta = tiny_meta()
    model = MsataModel(MsataConfig.from_dict(meta["model_config"]))
    return save_checkpoint(path, meta | {"state_dict": model.state_dict()})


@pytest.fixture()
def logged_model(mlflow_db: Path, tmp_path: Path) -> tuple[str, str]:
    """(run id, model URI) of a pyfunc logged from an untrained tiny checkpoint."""
    from modeling import tracking

    experiment = tracking.get_or_create_experiment("crema-d")
    run_id = tracking.create_run(experiment, "registry-test")
    checkpoint = tiny_checkpoint(tmp_path / "best.pt")
    return run_id, tracking.log_pyfunc_model(run_id, checkpoint, tiny_meta()["label_names"])


def tags(val_uar: float) -> dict:
    return {"dataset": "crema_d", "n_folds": 2, "splits_hash": "s", "feature_config_hash": "f", "val_uar_mean": val_uar}


@pytest.mark.slow
def test_champion_rule_and_a_registry_it_cannot_read(mlflow_db: Path, logged_model: tuple[str, str]) -> None:
    from mlflow import MlflowClient

    from modeling.tracking import RegistryError, register_and_promote

    _, uri = logged_model
    first = register_and_promote(uri, "crema-d", tags(0.5))
    assert first.champion and first.version == "1"  # no model yet: the only case of "no champion"
    assert not register_and_promote(uri, "crema-d", tags(0.4)).champion
    # The champion alias now points at a version that cannot be read (here: its row is gone).
    with sqlite3.connect(mlflow_db) as con:
        con.execute("DELETE FROM model_versions WHERE version = 1")
    with pytest.raises(RegistryError, match=r"cannot read the champion of msata-crema-d \(v1\)") as info:
        register_and_promote(uri, "crema-d", tags(0.9))
    assert "\n" not in str(info.value)
    client = MlflowClient()
    assert [str(mv.version) for mv in client.search_model_versions("name='msata-crema-d'")] == ["2"]  # nothing registered
    assert str(client.get_registered_model("msata-crema-d").aliases["champion"]) == "1"  # alias not moved
