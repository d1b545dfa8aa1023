"""MlflowRunLogger, the driver's run logger with MLflow, against a real SQLite tracking store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from modeling.tracking.run_logger import MlflowRunLogger
from modeling.training.run_logger import LoggerDescription, MlflowRef, build_run_logger


@pytest.fixture()
def sqlite_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tracking URI of its own, given to the logger (not through MLFLOW_TRACKING_URI); MLflow's URIs are put back by tests/conftest.py."""
    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the working directory, where MLflow's default ./mlruns would appear
    return f"sqlite:///{tmp_path / 'tracking.db'}"


def test_the_description_carries_only_a_given_uri() -> None:
    assert MlflowRunLogger().describe() == LoggerDescription("modeling.tracking.run_logger.MlflowRunLogger")
    rebuilt = build_run_logger(MlflowRunLogger("sqlite:////tmp/x.db").describe().to_dict())
    assert isinstance(rebuilt, MlflowRunLogger) and rebuilt.tracking_uri == "sqlite:////tmp/x.db"


def test_untracked_run_ids_never_reach_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # any import of MLflow fails
    logger = MlflowRunLogger()
    assert logger.start_child(None, "fold-0", {}) is None  # nothing to nest under
    for call in (
        lambda: logger.reopen(None),
        lambda: logger.set_tags(None, {"a": "b"}),
        lambda: logger.log_params(None, {"a": 1}),
        lambda: logger.log_metrics(None, {"a": 1.0}, step=3),
        lambda: logger.log_epoch(None, object()),
        lambda: logger.log_store_input(None, "store", "crema-d", "hash", 1),
        lambda: logger.log_learning_curves(None, [], "missing.png", "t"),
        lambda: logger.log_artifact(None, "missing.txt"),
        lambda: logger.log_confusion(None, [[1]], ["a"], "missing.png", "t"),
        lambda: logger.register_model(None, {}, None, [], {}),
        lambda: logger.end(None, "FAILED"),
    ):
        assert call() is None
    with logger.ended_on_failure(None):
        pass


@pytest.mark.slow
def test_a_cross_validation_is_recorded_in_mlflow(sqlite_uri: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from training_fixtures import TINY_MODEL, build_tiny_store

    from modeling.data.splits import SplitConfig
    from modeling.training.experiment import run_cross_validation
    from modeling.training.train_loop import TrainConfig

    build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=3e-3, warmup_epochs=0.5, num_workers=0, max_duration_s=1.5)
    run_dir = tmp_path / "run"
    result = run_cross_validation(
        str(tmp_path / "store"),
        "crema-d",
        cfg,
        SplitConfig(n_folds=2),
        TINY_MODEL,
        run_dir=run_dir,
        logger=MlflowRunLogger(sqlite_uri),
        register=False,
    )
    # what a resume and the torchrun workers read back
    spec = json.loads((run_dir / "experiment.json").read_text())
    assert MlflowRef(**spec["mlflow"]).parent_run_id == result.parent_run_id
    assert json.loads((run_dir / "run_logger.json").read_text()) == {
        "component": "modeling.tracking.run_logger.MlflowRunLogger",
        "options": {"tracking_uri": sqlite_uri},
    }
    assert not (tmp_path / "home" / "mlflow" / "mlflow.db").exists()  # the given store, not MSATA_HOME's
    assert (tmp_path / "artifacts" / "msata-crema-d").is_dir() and not (tmp_path / "mlruns").exists()  # its artifacts beside it

    client = MlflowClient(tracking_uri=sqlite_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("cv-crema-d-")
    assert client.get_experiment(parent.info.experiment_id).name == "msata-crema-d"
    assert parent.data.params["train.epochs"] == "2" and parent.data.params["n_clips"] == "20"
    assert json.loads(parent.data.params["label_names"]) == result.label_names
    assert parent.data.tags["msata.run_dir"] == str(run_dir) and len(parent.data.tags["mlflow.source.git.commit"]) == 40
    assert parent.data.metrics["test_uar_mean"] == pytest.approx(result.summary["uar_mean"])
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["msata-crema-d-features"]
    artifacts = {f.path for folder in ("splits", "config", "plots") for f in client.list_artifacts(parent.info.run_id, folder)}
    assert artifacts == {"splits/splits.csv", "splits/splits.json", "config/experiment.json", "plots/confusion_pooled.png"}

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["fold-0", "fold-1"]
    for fold in result.folds:
        run = client.get_run(fold.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["msata.fold"] == str(fold.index) and run.data.tags["msata.world_size"] == "1"
        assert run.data.params["fold"] == str(fold.index) and run.data.metrics["test_uar"] == pytest.approx(fold.test["uar"])
        assert [m.step for m in client.get_metric_history(fold.run_id, "val_uar")] == [1, 2]
        assert {f.path for f in client.list_artifacts(fold.run_id, "plots")} == {"plots/confusion_test.png", "plots/learning_curves.png"}
        assert json.loads((run_dir / f"fold_{fold.index}" / "mlflow_run.json").read_text()) == {"run_id": fold.run_id}
    assert result.registered is None and not client.search_registered_models()  # register=False
