"""The train-msata flow end to end on a tiny store: folds, MLflow runs, registry, pyfunc."""

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flow_servers import MSATA, REPO, clean_env
from training_fixtures import TINY_MODEL, build_tiny_store

from features.config import FeatureConfig
from modeling.data.splits import ProtocolError, SplitConfig
from modeling.training.train_loop import TrainConfig

pytestmark = [pytest.mark.slow]
TRAIN = {"epochs": 2, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0.5, "num_workers": 0, "max_duration_s": 1.5, "patience": 5}


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def write_wav(path: Path, seconds: float = 1.5, rate: int = 16_000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((signal * 32767).astype(np.int16).tobytes())
    return path


@pytest.mark.usefixtures("prefect_harness")
def test_flow_trains_logs_registers_and_serves(home: Path, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from flows.train import progress_hook, train_msata
    from modeling.tracking.registry import compare_models, register_and_promote
    from modeling.tracking.runs import configure_tracking

    store = tmp_path / "store"
    build_tiny_store(store, n_speakers=5, clips_per_speaker=4)
    events = []
    with progress_hook(events.append):  # the CLI's progress bars listen the same way; nothing is a flow parameter
        state = train_msata(str(store), "crema-d", train=TRAIN, splits={"n_folds": 2}, model=TINY_MODEL, return_state=True)
    result = state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    assert {(e.fold, e.epoch) for e in events if e.kind == "epoch_end"} == {(0, 1), (0, 2), (1, 1), (1, 2)}

    assert len(result["folds"]) == 2 and result["selected_fold"] in (0, 1)
    assert 0.0 <= result["summary"]["uar_mean"] <= 1.0
    assert result["registered"]["champion"] and result["registered"]["version"] == "1"
    assert Path(result["run_dir"]).is_relative_to(home)  # project-local default, under MSATA_HOME
    from modeling.training.checkpoint import load_checkpoint

    assert load_checkpoint(result["folds"][0]["best_path"])["modalities"] == ["audio", "video"]
    assert (home / "mlflow" / "mlflow.db").exists()

    configure_tracking()
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.metrics["test_uar_mean"] == pytest.approx(result["summary"]["uar_mean"])
    assert parent.data.params["train.epochs"] == "2" and parent.data.params["splits.n_folds"] == "2"
    assert parent.data.tags["prefect.flow_run_id"] == flow_run_id
    assert_cv_artifacts(flow_run_id, result)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    history = client.get_metric_history(children[0].info.run_id, "val_uar")
    assert [m.step for m in history] == [1, 2]
    child_files = {f.path for f in client.list_artifacts(children[0].info.run_id, "plots")}
    assert child_files == {"plots/confusion_test.png", "plots/learning_curves.png"}
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "splits")} == {"splits/splits.csv", "splits/splits.json"}
    assert (home / "mlflow" / "artifacts").is_dir()

    table = compare_models("crema-d")
    assert table.loc[0, "aliases"] == "champion" and table.loc[0, "test_uar_mean"] == pytest.approx(result["summary"]["uar_mean"])

    # The registered pyfunc loads and predicts from a file path (features extracted with the store's config).
    model = mlflow.pyfunc.load_model("models:/msata-crema-d@champion")
    out = model.predict(pd.DataFrame({"path": [str(write_wav(tmp_path / "probe.wav"))]}))
    assert list(out.columns[:2]) == ["path", "label"] and out.loc[0, "label"] in result["label_names"]
    assert out.filter(like="prob_").sum(axis=1).iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert out.loc[0, "modalities"] == "audio" and pd.isna(out.loc[0, "error"])
    # The CLI answers from the registry too, without MLflow's per-artifact download bars above the answer.
    done = subprocess.run(
        [MSATA, "predict", str(tmp_path / "probe.wav"), "--model", "models:/msata-crema-d@champion"],
        env=clean_env(tmp_path) | {"MSATA_HOME": str(home)}, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "probe.wav:" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Downloading artifacts" not in done.stdout + done.stderr

    # Champion rule: only a strictly better validation UAR on the same protocol moves the alias;
    # the test score plays no part.
    mv = client.get_model_version("msata-crema-d", "1")
    tags = dict(mv.tags)
    uri = result["registered"]["model_uri"]
    worse = register_and_promote(uri, "crema-d", tags | {"val_uar_mean": float(tags["val_uar_mean"]) - 0.1, "test_uar_mean": 2.0})
    other = register_and_promote(uri, "crema-d", tags | {"val_uar_mean": 2.0, "feature_config_hash": "0123456789ab"})
    better = register_and_promote(uri, "crema-d", tags | {"val_uar_mean": float(tags["val_uar_mean"]) + 0.1, "test_uar_mean": 0.0})
    assert (worse.champion, other.champion, better.champion) == (False, False, True)
    assert "another protocol" in other.reason
    assert str(client.get_model_version_by_alias("msata-crema-d", "champion").version) == better.version


def assert_cv_artifacts(flow_run_id: str, result: dict) -> None:
    """The flow run published the cross-validation table (folds, then mean ± std) and a link to the MLflow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {"cv-crema-d", "mlflow-run-crema-d"}, by_key
    table = by_key["cv-crema-d"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["fold"] for r in rows] == ["0", "1", "mean ± std"]
    assert rows[0]["test UAR"] == pytest.approx(result["folds"][0]["test"]["uar"], abs=1e-4)
    assert rows[-1]["test UAR"] == f"{result['summary']['uar_mean']:.4f} ± {result['summary']['uar_std']:.4f}"
    link = by_key["mlflow-run-crema-d"]
    assert (
        link.type == "markdown" and result["parent_run_id"] in link.data and "mlflow ui --backend-store-uri sqlite:///" in link.description
    )


def test_resume_skips_finished_folds(home: Path, tmp_path: Path) -> None:
    from modeling.training.experiment import run_cross_validation
    from modeling.training.run_logger import NullRunLogger

    store = tmp_path / "store"
    build_tiny_store(store, n_speakers=5, clips_per_speaker=4)
    cfg = TrainConfig(**(TRAIN | {"epochs": 1}))
    first = run_cross_validation(str(store), "crema-d", cfg, SplitConfig(n_folds=2), TINY_MODEL, logger=NullRunLogger())
    stamp = [(Path(first.run_dir) / f"fold_{i}" / "best.pt").stat().st_mtime_ns for i in range(2)]
    again = run_cross_validation(str(store), "crema-d", cfg, SplitConfig(n_folds=2), TINY_MODEL, logger=NullRunLogger(), resume=True)
    assert again.run_dir == first.run_dir and again.summary == first.summary
    assert [(Path(again.run_dir) / f"fold_{i}" / "best.pt").stat().st_mtime_ns for i in range(2)] == stamp


def test_rerun_reproduces_the_fold_models(home: Path, tmp_path: Path) -> None:
    import torch

    from modeling.training.checkpoint import load_checkpoint
    from modeling.training.experiment import run_cross_validation
    from modeling.training.run_logger import NullRunLogger

    store = tmp_path / "store"
    build_tiny_store(store, n_speakers=5, clips_per_speaker=4)
    cfg = TrainConfig(**(TRAIN | {"epochs": 1}))
    runs = []
    for name in ("a", "b"):
        torch.rand(17)  # whatever ran before in the process must not change the initial weights
        runs.append(
            run_cross_validation(
                str(store), "crema-d", cfg, SplitConfig(n_folds=2), TINY_MODEL, run_dir=tmp_path / name, logger=NullRunLogger()
            )
        )
    assert runs[0].summary == runs[1].summary
    for fold in range(2):
        a, b = (load_checkpoint(tmp_path / name / f"fold_{fold}" / "best.pt")["state_dict"] for name in ("a", "b"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_protocol_errors_before_training(home: Path, tmp_path: Path) -> None:
    from modeling.training.experiment import prepare_experiment
    from modeling.training.run_logger import NullRunLogger
    from storage.feature_store import FeatureStore

    store = tmp_path / "store"
    build_tiny_store(store, n_speakers=3, clips_per_speaker=2)
    with pytest.raises(ProtocolError, match="3 speakers cannot make 5"):
        prepare_experiment(str(store), "crema-d", TrainConfig(), SplitConfig(n_folds=5), TINY_MODEL, logger=NullRunLogger())
    with pytest.raises(ProtocolError, match="feature config"):
        prepare_experiment(
            str(store), "crema-d", TrainConfig(), SplitConfig(n_folds=5), TINY_MODEL, FeatureConfig(), logger=NullRunLogger()
        )
    with pytest.raises(ProtocolError, match="3 speakers cannot make 2"):  # a fold of 2 test speakers leaves 1: validation
        prepare_experiment(str(store), "crema-d", TrainConfig(), SplitConfig(n_folds=2), TINY_MODEL, logger=NullRunLogger())
    ravdess_labels = tmp_path / "ravdess_labels"
    build_tiny_store(ravdess_labels, n_speakers=4, clips_per_speaker=2, labels=["calm", "surprised"])
    with pytest.raises(ProtocolError, match=r"\['calm', 'surprised'\] are not in the class list"):
        prepare_experiment(str(ravdess_labels), "crema-d", TrainConfig(), SplitConfig(n_folds=2), TINY_MODEL, logger=NullRunLogger())
    with pytest.raises(ProtocolError, match="contradict"):
        prepare_experiment(
            str(ravdess_labels), "ravdess", TrainConfig(), SplitConfig(n_folds=2), TINY_MODEL | {"n_mels": 80}, logger=NullRunLogger()
        )
    empty = tmp_path / "empty"
    FeatureStore.create(str(empty), FeatureConfig())
    with pytest.raises(ProtocolError, match="empty"):
        prepare_experiment(str(empty), "crema-d", TrainConfig(), logger=NullRunLogger())
    assert not (home / "runs").exists()  # nothing was created before the errors
