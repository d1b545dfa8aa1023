"""The driver's run logger interface: what the driver tells it, in which order, and the logger that tracks nothing."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from training_fixtures import TINY_MODEL, build_tiny_store

from modeling.data.splits import SplitConfig
from modeling.training.run_logger import (
    LoggerDescription,
    MlflowRef,
    NullRunLogger,
    RunLogger,
    RunStatus,
    build_run_logger,
    load_run_logger,
    record_run_logger,
)
from modeling.training.train_loop import TrainConfig

CFG = TrainConfig(epochs=1, batch_size=4, lr=3e-3, warmup_epochs=0.5, num_workers=0, max_duration_s=1.5)


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    return str(tmp_path / "store")


class RecordingLogger(RunLogger):
    """A test double of the interface: every call, in order, as (method, run id, detail)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def describe(self) -> LoggerDescription:
        return LoggerDescription("tests.RecordingLogger")

    def start_experiment(self, dataset: str, name: str, tags: Mapping[str, str]) -> MlflowRef | None:
        self.calls.append(("start_experiment", None, name.rsplit("-", 1)[0]))
        assert tags["msata.dataset"] == dataset
        return MlflowRef("exp", "parent")

    def start_child(self, parent: MlflowRef | None, name: str, tags: Mapping[str, str]) -> str | None:
        self.calls.append(("start_child", parent.parent_run_id if parent else None, name))
        return f"run-{name}"

    def reopen(self, run_id: str | None) -> None:
        self.calls.append(("reopen", run_id))

    def set_tags(self, run_id: str | None, tags: Mapping[str, str]) -> None:
        self.calls.append(("set_tags", run_id, tuple(sorted(tags))))

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        self.calls.append(("log_params", run_id, "train" in params or "fold" in params))

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        self.calls.append(("log_metrics", run_id, "test_uar" in metrics or "test_uar_mean" in metrics))

    def log_epoch(self, run_id: str | None, record: Any) -> None:
        self.calls.append(("log_epoch", run_id, record.epoch))

    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        assert Path(path).is_file()
        self.calls.append(("log_artifact", run_id, artifact_path))

    def log_store_input(self, run_id: str | None, store_path: str, dataset: str, feature_config_hash: str, n_clips: int) -> None:
        self.calls.append(("log_store_input", run_id, n_clips))

    def log_confusion(self, run_id: str | None, confusion: Any, label_names: Sequence[str], path: str | Path, title: str) -> None:
        self.calls.append(("log_confusion", run_id, Path(path).name))

    def log_learning_curves(self, run_id: str | None, history: Sequence[Any], path: str | Path, title: str) -> None:
        self.calls.append(("log_learning_curves", run_id, len(history)))

    def register_model(
        self, run_id: str | None, spec: Mapping[str, Any], selected: Any, folds: Sequence[Any], summary: Mapping[str, float]
    ) -> dict[str, Any] | None:
        self.calls.append(("register_model", run_id, selected.index))
        return {"version": "1", "run": run_id}

    def end(self, run_id: str | None, status: RunStatus = "FINISHED") -> None:
        self.calls.append(("end", run_id, status))


def _fold(index: int, start: tuple[Any, ...], end: str) -> list[tuple[Any, ...]]:
    run = f"run-fold-{index}"
    head = [start, ("set_tags", run, ("msata.world_size",)), ("log_params", run, True)]
    if end != "FINISHED":  # stopped at its first step
        return [*head, ("end", run, end), ("end", "parent", end)]
    tail = [
        ("log_epoch", run, 1),
        ("log_metrics", run, True),
        ("log_confusion", run, "confusion_test.png"),
        ("log_learning_curves", run, 1),
    ]
    return [*head, *tail, ("end", run, "FINISHED")]


@pytest.mark.slow
def test_the_driver_calls_the_interface_in_order_and_ends_runs_on_failure(store: str, tmp_path: Path) -> None:
    from modeling.training.experiment import run_cross_validation

    run_dir = tmp_path / "run"

    def cv(logger: RunLogger, resume: bool, error: BaseException | None = None):
        def progress(event):
            if error is not None and event.fold == 1 and event.kind == "step":
                raise error

        return run_cross_validation(
            store, "crema-d", CFG, SplitConfig(n_folds=2), TINY_MODEL, run_dir=run_dir, resume=resume, logger=logger, progress=progress
        )

    first = RecordingLogger()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in fold 1: the fold and the experiment KILLED
        cv(first, resume=False, error=KeyboardInterrupt())
    prepared = [
        ("start_experiment", None, "cv-crema-d"),
        ("log_store_input", "parent", 20),
        ("log_params", "parent", True),
        ("log_artifact", "parent", "splits"),
        ("log_artifact", "parent", "splits"),
        ("set_tags", "parent", ()),
        ("log_artifact", "parent", "config"),
    ]
    assert first.calls == [
        *prepared,
        *_fold(0, ("start_child", "parent", "fold-0"), "FINISHED"),
        *_fold(1, ("start_child", "parent", "fold-1"), "KILLED"),
    ]
    assert json.loads((run_dir / "fold_1" / "mlflow_run.json").read_text()) == {"run_id": "run-fold-1"}

    resumed = [("reopen", "parent"), ("set_tags", "parent", ()), ("log_artifact", "parent", "config")]
    second = RecordingLogger()
    with pytest.raises(RuntimeError, match="disk full"):  # an error: FAILED; the same runs are reopened, fold 0 is not rerun
        cv(second, resume=True, error=RuntimeError("disk full"))
    assert second.calls == [*resumed, *_fold(1, ("reopen", "run-fold-1"), "FAILED")]

    third = RecordingLogger()
    result = cv(third, resume=True)
    assert third.calls == [
        *resumed,
        *_fold(1, ("reopen", "run-fold-1"), "FINISHED"),
        ("log_metrics", "parent", True),
        ("log_confusion", "parent", "confusion_pooled.png"),
        ("register_model", "parent", result.selected_fold),
        ("end", "parent", "FINISHED"),
    ]
    assert result.parent_run_id == "parent" and [f.run_id for f in result.folds] == ["run-fold-0", "run-fold-1"]
    assert result.registered == {"version": "1", "run": "parent"}
    assert json.loads((run_dir / "run_logger.json").read_text()) == {"component": "tests.RecordingLogger", "options": {}}


@pytest.mark.slow
def test_the_null_logger_runs_a_cross_validation_without_a_tracker(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modeling.training.experiment import run_cross_validation

    monkeypatch.chdir(tmp_path)  # where MLflow would put ./mlruns
    monkeypatch.setitem(sys.modules, "mlflow", None)  # any import of MLflow fails
    run_dir = tmp_path / "run"
    result = run_cross_validation(store, "crema-d", CFG, SplitConfig(n_folds=2), TINY_MODEL, run_dir=run_dir, logger=NullRunLogger())
    assert len(result.folds) == 2 and 0.0 <= result.summary["uar_mean"] <= 1.0
    assert result.parent_run_id is None and result.registered is None and all(f.run_id is None for f in result.folds)
    assert not list(tmp_path.rglob("mlruns")) and not list(tmp_path.rglob("mlflow*")) and not list(tmp_path.rglob("*.png"))
    assert json.loads((run_dir / "experiment.json").read_text())["mlflow"] is None
    assert isinstance(load_run_logger(run_dir), NullRunLogger)  # what run_fold, finalize and torchrun workers rebuild
    # finalize again with the logger the run directory recorded: the same result, still nothing tracked
    from modeling.training.experiment import finalize_experiment

    assert finalize_experiment(run_dir).summary == result.summary


def test_a_logger_is_rebuilt_from_its_description_only_from_msata_packages(tmp_path: Path) -> None:
    null = NullRunLogger()
    assert isinstance(null, RunLogger)
    assert null.describe() == LoggerDescription("modeling.training.run_logger.NullRunLogger")
    assert isinstance(build_run_logger(null.describe().to_dict()), NullRunLogger)
    record_run_logger(tmp_path, null)
    assert isinstance(load_run_logger(tmp_path), NullRunLogger)
    with pytest.raises(ValueError, match="not one of msata's"):  # a run directory is data: it names no arbitrary code
        build_run_logger({"component": "subprocess.Popen", "options": {"args": ["true"]}})
    with pytest.raises(TypeError, match="not a RunLogger"):
        build_run_logger(LoggerDescription("modeling.training.run_dir.RunDirError"))
    with pytest.raises(FileNotFoundError, match="run_logger.json"):
        load_run_logger(tmp_path / "elsewhere")


def test_an_incomplete_logger_cannot_be_built() -> None:
    class Partial(RunLogger):
        def describe(self) -> LoggerDescription:
            return LoggerDescription("x.Partial")

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_ended_on_failure_marks_every_tracked_run_and_keeps_the_error() -> None:
    logger = RecordingLogger()
    with pytest.raises(ValueError, match="boom"), logger.ended_on_failure("fold", None, "parent"):
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), logger.ended_on_failure("fold"):
        raise KeyboardInterrupt
    with logger.ended_on_failure("fold"):
        pass
    assert logger.calls == [("end", "fold", "FAILED"), ("end", "parent", "FAILED"), ("end", "fold", "KILLED")]

    class Unreachable(RecordingLogger):
        def end(self, run_id: str | None, status: RunStatus = "FINISHED") -> None:
            raise ConnectionError("tracking server down")

    with pytest.raises(ValueError, match="boom") as info, Unreachable().ended_on_failure("fold"):
        raise ValueError("boom")
    assert "run fold could not be marked FAILED (Unreachable): tracking server down" in info.value.__notes__
