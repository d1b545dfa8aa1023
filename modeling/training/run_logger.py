"""The run logger: everything the cross-validation driver tells a tracker, behind one small interface.

Modelled on torchtune's ``MetricLoggerInterface`` (``log``, ``log_dict``, ``log_config``,
``close``, one implementation per backend, chosen by a ``_component_`` path in the config):
the driver (``experiment.py``, ``fold_run.py``, ``fold_worker.py``) calls only
:class:`RunLogger` and imports no tracker. ``modeling.tracking.run_logger.MlflowRunLogger``
implements it with MLflow (``msata train``, the flows); :class:`NullRunLogger` tracks nothing.
msata's experiments outlive a process, so unlike torchtune's one run per logger the interface
names its runs: an experiment-level (parent) run, a run per fold nested under it, reopened
when a killed experiment resumes, ended with a status.

Run ids. :meth:`RunLogger.start_experiment` returns a :class:`MlflowRef` (experiment id and
parent run id), which the driver keeps in ``experiment.json`` (key ``mlflow``);
:meth:`RunLogger.start_child` returns a fold's run id, kept in ``fold_<i>/mlflow_run.json``.
A resume hands them back to :meth:`RunLogger.reopen`, so it goes on in the same runs. ``None``
means "not tracked": a logger that tracks nothing gives out no ids, and every method ignores a
None id, so the driver calls its logger unconditionally.

Other processes. A logger is rebuilt from a :class:`LoggerDescription` (the class's dotted
path, in msata's packages, and its keyword arguments; JSON): ``prepare_experiment`` records
the description in the run directory (``run_logger.json``), and ``run_fold`` and
``finalize_experiment`` when not handed a logger (the flow's tasks) and the torchrun workers
of a fold (``fold_worker.py``) rebuild it with :func:`load_run_logger`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from modeling.training.run_dir import LOGGER_FILE, write_json

if TYPE_CHECKING:
    import numpy as np

    from modeling.training.train_loop import EpochRecord

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
BUILDABLE_PACKAGES = ("modeling.",)  # a run directory is data: only msata's own classes are built from it


@dataclass(frozen=True)
class MlflowRef:
    """An experiment's tracked ids (``experiment.json``'s ``mlflow``): a resume reopens the same runs.
    Named for MLflow, msata's tracker; any logger's ids fit in it."""

    experiment_id: str
    parent_run_id: str


@dataclass(frozen=True)
class LoggerDescription:
    """How to build a logger in another process: ``component`` (``module.Class``) called with ``options``."""

    component: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"component": self.component, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoggerDescription:
        return cls(str(data["component"]), dict(data.get("options") or {}))


@runtime_checkable
class RunLogger(Protocol):
    """What the driver logs, and where. Every ``run_id`` may be None ("not tracked"): the call then does nothing.

    Implementations subclass it (its methods are abstract) and inherit :meth:`ended_on_failure`.
    """

    @abstractmethod
    def describe(self) -> LoggerDescription:
        """How to build this logger again in another process (:func:`build_run_logger`)."""

    @abstractmethod
    def start_experiment(self, dataset: str, name: str, tags: Mapping[str, str]) -> MlflowRef | None:
        """Open a new experiment-level (parent) run ``name`` for ``dataset``; None when nothing is tracked."""

    @abstractmethod
    def start_child(self, parent: MlflowRef | None, name: str, tags: Mapping[str, str]) -> str | None:
        """Open a run nested under ``parent`` (a fold's); None when nothing is tracked or ``parent`` is None."""

    @abstractmethod
    def reopen(self, run_id: str | None) -> None:
        """Mark a run of an earlier attempt running again (a resume reuses its KILLED, FAILED or FINISHED runs)."""

    @abstractmethod
    def set_tags(self, run_id: str | None, tags: Mapping[str, str]) -> None:
        """Tags, set or overwritten (nothing for an empty mapping)."""

    @abstractmethod
    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Parameters, once per run: nested mappings become dotted names (``train.lr``), lists JSON, the rest ``str``."""

    @abstractmethod
    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        """Scalar metrics at ``step``."""

    @abstractmethod
    def log_epoch(self, run_id: str | None, record: EpochRecord) -> None:
        """One epoch's training and validation figures, at step ``record.epoch``."""

    @abstractmethod
    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        """Keep the file ``path`` with the run (under ``artifact_path``)."""

    @abstractmethod
    def log_store_input(self, run_id: str | None, store_path: str, dataset: str, feature_config_hash: str, n_clips: int) -> None:
        """The feature store the run trained on (lineage: path, feature config hash, clip count)."""

    @abstractmethod
    def log_confusion(
        self, run_id: str | None, confusion: np.ndarray | Sequence[Sequence[int]], label_names: Sequence[str], path: str | Path, title: str
    ) -> None:
        """A confusion-matrix plot, drawn at ``path`` (in the run directory) and kept with the run under ``plots``."""

    @abstractmethod
    def log_learning_curves(self, run_id: str | None, history: Sequence[EpochRecord], path: str | Path, title: str) -> None:
        """Loss and validation curves over the epochs, drawn at ``path`` and kept with the run under ``plots``."""

    @abstractmethod
    def register_model(
        self, run_id: str | None, spec: Mapping[str, Any], selected: Any, folds: Sequence[Any], summary: Mapping[str, float]
    ) -> dict[str, Any] | None:
        """Register the experiment's model: ``selected`` is the fold chosen on validation (a ``FoldResult``,
        its ``best_path`` the checkpoint), ``spec`` the experiment spec's JSON form, ``summary`` the test
        mean +- std. Returns the registration as a dict, None when nothing is registered."""

    @abstractmethod
    def end(self, run_id: str | None, status: RunStatus = "FINISHED") -> None:
        """End a run with ``status``."""

    @contextlib.contextmanager
    def ended_on_failure(self, *run_ids: str | None) -> Iterator[None]:
        """End ``run_ids`` when the block raises: KILLED for Ctrl-C, SystemExit and cancellation
        (BaseExceptions that are not Exceptions), FAILED for any other error; the error propagates.

        Runs are ended explicitly on success, so without this an interrupted experiment would
        stay RUNNING in the tracker forever.
        """
        try:
            yield
        except BaseException as err:
            status: RunStatus = "FAILED" if isinstance(err, Exception) else "KILLED"
            for run_id in filter(None, run_ids):
                try:
                    self.end(run_id, status)
                except Exception as mark_err:  # the original error matters more: keep it, say why the run stays RUNNING
                    err.add_note(f"run {run_id} could not be marked {status} ({type(self).__name__}): {mark_err}")
            raise


class NullRunLogger(RunLogger):
    """Tracks nothing: no run ids, no files, no tracker imported (what ``track=False`` was).

    There is no disk-only logger because the run directory already is one: ``experiment.json``,
    each fold's ``result.json`` and checkpoints (with the epoch history) and ``cv_result.json``
    hold every figure a tracker receives; the plots, drawn for a tracker's UI, are not drawn.
    """

    def describe(self) -> LoggerDescription:
        return LoggerDescription(f"{__name__}.{type(self).__name__}")

    def start_experiment(self, dataset: str, name: str, tags: Mapping[str, str]) -> MlflowRef | None:
        return None

    def start_child(self, parent: MlflowRef | None, name: str, tags: Mapping[str, str]) -> str | None:
        return None

    def reopen(self, run_id: str | None) -> None:
        pass

    def set_tags(self, run_id: str | None, tags: Mapping[str, str]) -> None:
        pass

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        pass

    def log_epoch(self, run_id: str | None, record: EpochRecord) -> None:
        pass

    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_store_input(self, run_id: str | None, store_path: str, dataset: str, feature_config_hash: str, n_clips: int) -> None:
        pass

    def log_confusion(
        self, run_id: str | None, confusion: np.ndarray | Sequence[Sequence[int]], label_names: Sequence[str], path: str | Path, title: str
    ) -> None:
        pass

    def log_learning_curves(self, run_id: str | None, history: Sequence[EpochRecord], path: str | Path, title: str) -> None:
        pass

    def register_model(
        self, run_id: str | None, spec: Mapping[str, Any], selected: Any, folds: Sequence[Any], summary: Mapping[str, float]
    ) -> dict[str, Any] | None:
        return None

    def end(self, run_id: str | None, status: RunStatus = "FINISHED") -> None:
        pass


def build_run_logger(description: LoggerDescription | Mapping[str, Any]) -> RunLogger:
    """The logger ``description`` names (a class in msata's packages, called with its options)."""
    if not isinstance(description, LoggerDescription):
        description = LoggerDescription.from_dict(description)
    module_name, _, class_name = description.component.rpartition(".")
    if not module_name.startswith(BUILDABLE_PACKAGES):
        raise ValueError(f"run logger {description.component!r} is not one of msata's ({', '.join(BUILDABLE_PACKAGES)}*)")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    logger = cls(**description.options) if isinstance(cls, type) else None
    if not isinstance(logger, RunLogger):
        raise TypeError(f"{description.component!r} is not a RunLogger")
    return logger


def record_run_logger(run_dir: str | Path, logger: RunLogger) -> Path:
    """Write ``logger``'s description into the run directory, for the steps and processes that come later."""
    return write_json(Path(run_dir) / LOGGER_FILE, logger.describe().to_dict())


def load_run_logger(run_dir: str | Path) -> RunLogger:
    """The logger ``prepare_experiment`` recorded in ``run_dir``."""
    path = Path(run_dir) / LOGGER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: prepare the experiment again (msata train --resume) to record its run logger")
    return build_run_logger(json.loads(path.read_text()))
