"""MLflow tracking and registry for msata (no server needed).

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else an embedded SQLite database
``sqlite:///$MSATA_HOME/mlflow/mlflow.db`` with artifacts under
``$MSATA_HOME/mlflow/artifacts`` (``MSATA_HOME`` defaults to ``<repo>/.msata``). Any local
``sqlite:///`` store keeps the artifacts of the experiments it creates beside its database
(``<db folder>/artifacts/<experiment>``), never in MLflow's ``./mlruns`` of the working
directory; a tracking server picks its own artifact store.

Layout: experiment ``msata-<dataset>``; one parent run per cross-validation (params
= flattened resolved config, metrics = test ``*_mean`` / ``*_std``, artifacts =
split files, resolved config, pooled confusion matrix, the pyfunc model) with one
nested run per fold (per-epoch metrics, learning curves, fold confusion matrix).

Parent runs carry MLflow's source tags (git commit, branch, dirty flag) and the
feature store as a dataset input (path, feature config hash, clip count). Runs are
ended explicitly: FINISHED on success, KILLED or FAILED when interrupted
(``RunLogger.ended_on_failure``). The registry (logged pyfunc, versions, champion rule)
is ``modeling/tracking/registry.py`` (it imports this module, never the other way round).
The training driver reaches these functions only through ``MlflowRunLogger``
(``modeling/tracking/run_logger.py``), its implementation of ``modeling.training.run_logger.RunLogger``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from features.recipes import canonical_name
from modeling.training.run_dir import write_json  # noqa: F401  (re-exported: run files are written atomically)

# One definition of the project-local home (MSATA_HOME, default ./.msata) for CLI, flows and library use.
from storage.home import msata_home

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAMPION = "champion"
PROTOCOL_TAGS = ("dataset", "n_folds", "splits_hash", "feature_config_hash")


def default_tracking_uri() -> str:
    db = msata_home() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def configure_tracking(uri: str | None = None) -> str:
    """Point MLflow (tracking and registry) at ``uri``, by default the resolved one, and return it."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    # MLflow draws a tqdm bar per artifact download ("Downloading artifacts: 1/77 ...", one line each
    # on a pipe): 77 of them above `msata predict --model models:/...`'s answer. The user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow logs at INFO its SQLite schema set-up on every new database and each step of logging a
    # model (uv.lock copied, input example validated): a dozen lines above msata's own summary of a
    # run. Warnings and errors still show.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def model_name(dataset: str) -> str:
    """Experiment and registered model name of a dataset, in its one spelling (``msata-crema-d``)."""
    return f"msata-{canonical_name(dataset)}"


def get_or_create_experiment(dataset: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    name = model_name(dataset)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    db = sqlite_database(client.tracking_uri)
    if db is not None:  # else a server, which picks its own artifact store
        root = artifact_root(db, name)
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    return client.create_experiment(name, artifact_location=location)


def sqlite_database(uri: str) -> Path | None:
    """The database file of a local ``sqlite:///`` tracking URI; None for any other store (a server, an in-memory database)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    return Path(path).resolve() if path and path != ":memory:" else None


def artifact_root(db: Path, name: str) -> Path:
    """Where experiment ``name`` of the SQLite store ``db`` keeps its artifacts: beside the database
    (``$MSATA_HOME/mlflow/artifacts/<name>`` for the default store). Without it MLflow would use
    ``./mlruns`` of whatever directory the process runs in."""
    return db.parent / "artifacts" / name


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}; values as MLflow param strings."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def log_params(run_id: str, params: dict[str, str]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        MlflowClient().log_batch(run_id, params=items[start : start + 100])


def log_history(run_id: str, history: Sequence[Any]) -> None:
    """Per-epoch metrics (EpochRecord-like objects) with step = epoch."""
    import time as _time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(_time.time() * 1000)
    metrics = [
        Metric(name, float(getattr(record, name)), now, int(record.epoch))
        for record in history
        for name in (
            "train_loss",
            "train_ce",
            "train_ctm",
            "ctm_weight",  # the epoch's mean CTM weight (train.ctm_schedule): read train_ctm beside it
            "val_loss",
            "val_wa",
            "val_uar",
            "val_macro_f1",
            "lr",
            "train_clips_per_s",
            "data_wait_share",
        )
    ]
    for start in range(0, len(metrics), 500):
        MlflowClient().log_batch(run_id, metrics=metrics[start : start + 500])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time as _time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(_time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def plot_confusion(confusion: np.ndarray, label_names: Sequence[str], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(label_names), 0.8 + 0.7 * len(label_names)))
    ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_learning_curves(history: Sequence[Any], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in history]
    fig, (loss_ax, uar_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [r.train_loss for r in history], label="train total")
    loss_ax.plot(epochs, [r.train_ce for r in history], label="train CE")
    loss_ax.plot(epochs, [r.val_loss for r in history], label="val CE")
    loss_ax.set_xlabel("epoch")
    loss_ax.legend()
    uar_ax.plot(epochs, [r.val_uar for r in history], label="val UAR")
    uar_ax.plot(epochs, [r.val_wa for r in history], label="val WA")
    uar_ax.set_xlabel("epoch")
    uar_ax.set_ylim(0, 1)
    uar_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def create_run(experiment_id: str, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    from mlflow import MlflowClient

    all_tags = {"mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return MlflowClient().create_run(experiment_id, tags=all_tags, run_name=name).info.run_id


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


def reopen_run(run_id: str) -> None:
    """Mark a run RUNNING again (a resumed experiment reuses its KILLED or FAILED runs)."""
    from mlflow import MlflowClient

    MlflowClient().update_run(run_id, status="RUNNING")


def source_tags() -> dict[str, str]:
    """MLflow's source tags for a run started from this checkout: git commit, branch, remote, dirty flag."""
    import subprocess

    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": str(REPO_ROOT)}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):  # no git, or it hung: the run is still worth tracking
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["msata.git.dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
        for key, args in (
            ("mlflow.source.git.branch", ("rev-parse", "--abbrev-ref", "HEAD")),
            ("mlflow.source.git.repoURL", ("remote", "get-url", "origin")),
        ):
            value = git(*args)
            if value:
                tags[key] = value
    return tags


def log_store_input(run_id: str, store_path: str, dataset: str, feature_config_hash: str, n_clips: int) -> None:
    """Dataset lineage: the feature store a run trained on (path, feature config hash, clip count) as an MLflow input."""
    import warnings

    from mlflow import MlflowClient
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    if "://" in store_path and not store_path.startswith("file://"):
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": the first match is right for a URL
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(store_path)
    else:
        source = LocalArtifactDatasetSource(str(Path(store_path).resolve()) if "://" not in store_path else store_path)
    entity = MetaDataset(source, name=f"msata-{dataset}-features", digest=feature_config_hash[:36])._to_mlflow_entity()
    tags = {
        "mlflow.data.context": "training",
        "store_path": store_path,
        "feature_config_hash": feature_config_hash,
        "n_clips": str(n_clips),
    }
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag(k, v) for k, v in tags.items()])])


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    from mlflow import MlflowClient

    MlflowClient().log_artifact(run_id, str(path), artifact_path)
