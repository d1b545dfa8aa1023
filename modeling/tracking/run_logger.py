"""``MlflowRunLogger``: the training driver's :class:`~modeling.training.run_logger.RunLogger` with MLflow.

A thin shell over ``modeling/tracking/runs.py`` (runs, params, metrics, artifacts, lineage,
plots) and ``registry.py`` (the logged pyfunc, registration once per experiment, the champion
rule), so a cross-validation logs exactly what it logged when the driver called them itself:
experiment ``msata-<dataset>``, parent run ``cv-<dataset>-<key>`` with source tags, nested
``fold-<i>`` runs, plots under ``plots/``.

The tracking URI is resolved as before (``MLFLOW_TRACKING_URI``, else the SQLite store under
``MSATA_HOME``) unless one is given; given, it is part of :meth:`MlflowRunLogger.describe` and
so of the run directory's ``run_logger.json`` (keep credentials in MLflow's environment
variables, not in the URI). MLflow is configured on each call that reaches it, and a None run
id (an experiment or a rank that is not tracked) never does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from modeling.tracking import runs as tracking
from modeling.training.run_logger import LoggerDescription, MlflowRef, RunLogger, RunStatus

if TYPE_CHECKING:
    from modeling.training.train_loop import EpochRecord

F = TypeVar("F", bound=Callable[..., Any])


def _tracked(method: F) -> F:
    """The method for a run id; nothing (and no MLflow) for None."""

    @functools.wraps(method)
    def wrapper(self: MlflowRunLogger, run_id: str | None, *args: Any, **kwargs: Any) -> Any:
        if run_id is None:
            return None
        self.configure()
        return method(self, run_id, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class MlflowRunLogger(RunLogger):
    """Log msata's experiments to MLflow at ``tracking_uri`` (default: the resolved one, see module docstring)."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri

    def describe(self) -> LoggerDescription:
        return LoggerDescription(f"{__name__}.{type(self).__name__}", {"tracking_uri": self.tracking_uri} if self.tracking_uri else {})

    def configure(self) -> str:
        """Point MLflow at this logger's tracking URI; returns it."""
        return tracking.configure_tracking(self.tracking_uri)

    def start_experiment(self, dataset: str, name: str, tags: Mapping[str, str]) -> MlflowRef:
        self.configure()
        experiment_id = tracking.get_or_create_experiment(dataset)
        return MlflowRef(experiment_id, tracking.create_run(experiment_id, name, tags=dict(tags) | tracking.source_tags()))

    def start_child(self, parent: MlflowRef | None, name: str, tags: Mapping[str, str]) -> str | None:
        if parent is None:  # an experiment that is not tracked has no runs to nest under
            return None
        self.configure()
        return tracking.create_run(parent.experiment_id, name, parent.parent_run_id, dict(tags))

    @_tracked
    def reopen(self, run_id: str) -> None:
        tracking.reopen_run(run_id)

    @_tracked
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        if tags:
            tracking.set_tags(run_id, dict(tags))

    @_tracked
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        tracking.log_params(run_id, tracking.flatten(dict(params)))

    @_tracked
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        tracking.log_metrics(run_id, dict(metrics), step)

    @_tracked
    def log_epoch(self, run_id: str, record: EpochRecord) -> None:
        tracking.log_history(run_id, [record])

    @_tracked
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        tracking.log_artifact(run_id, path, artifact_path)

    @_tracked
    def log_store_input(self, run_id: str, store_path: str, dataset: str, feature_config_hash: str, n_clips: int) -> None:
        tracking.log_store_input(run_id, store_path, dataset, feature_config_hash, n_clips)

    @_tracked
    def log_confusion(
        self, run_id: str, confusion: np.ndarray | Sequence[Sequence[int]], label_names: Sequence[str], path: str | Path, title: str
    ) -> None:
        tracking.log_artifact(run_id, tracking.plot_confusion(np.asarray(confusion), label_names, path, title), "plots")

    @_tracked
    def log_learning_curves(self, run_id: str, history: Sequence[EpochRecord], path: str | Path, title: str) -> None:
        tracking.log_artifact(run_id, tracking.plot_learning_curves(history, path, title), "plots")

    @_tracked
    def register_model(
        self, run_id: str, spec: Mapping[str, Any], selected: Any, folds: Sequence[Any], summary: Mapping[str, float]
    ) -> dict[str, Any]:
        from modeling.tracking.registry import register_experiment_model

        return asdict(register_experiment_model(dict(spec), run_id, selected, list(folds), dict(summary)))

    @_tracked
    def end(self, run_id: str, status: RunStatus = "FINISHED") -> None:
        tracking.end_run(run_id, status)
