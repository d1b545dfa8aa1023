"""MLflow tracking and registry for msata (no server needed).

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else an embedded SQLite database
``sqlite:///$MSATA_HOME/mlflow/mlflow.db`` with artifacts under
``$MSATA_HOME/mlflow/artifacts`` (``MSATA_HOME`` defaults to ``<repo>/.msata``).

Layout: experiment ``msata-<dataset>``; one parent run per cross-validation (params
= flattened resolved config, metrics = test ``*_mean`` / ``*_std``, artifacts =
split files, resolved config, pooled confusion matrix, the pyfunc model) with one
nested run per fold (per-epoch metrics, learning curves, fold confusion matrix).

Registry: the model is registered as ``msata-<dataset>``; each version carries the
protocol as tags (dataset, n_folds, splits_hash, feature_config_hash) and its test
metrics. The ``champion`` alias moves to a new version only when no champion exists
or the champion was evaluated on the same protocol and the new test UAR mean is
strictly higher.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

# One definition of the project-local home (MSATA_HOME, default ./.msata) for CLI, flows and library use.
from flows.settings import msata_home  # tiny module, no heavy imports

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAMPION = "champion"
PROTOCOL_TAGS = ("dataset", "n_folds", "splits_hash", "feature_config_hash")


def default_tracking_uri() -> str:
    db = msata_home() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def configure_tracking() -> str:
    """Point MLflow (tracking and registry) at the resolved URI and return it."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def model_name(dataset: str) -> str:
    from modeling.splits import normalize_dataset

    return f"msata-{normalize_dataset(dataset)}"


def get_or_create_experiment(dataset: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    name = model_name(dataset)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so compare URIs rather than test the variable.
    if tracking_uri() == default_tracking_uri():  # a user's server picks its own artifact store
        root = msata_home() / "mlflow" / "artifacts" / name
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    return client.create_experiment(name, artifact_location=location)


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
        for name in ("train_loss", "train_ce", "train_ctm", "val_loss", "val_wa", "val_uar", "val_macro_f1", "lr", "train_clips_per_s", "data_wait_share")
    ]
    for start in range(0, len(metrics), 500):
        MlflowClient().log_batch(run_id, metrics=metrics[start : start + 500])


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    import time as _time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(_time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


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


def end_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


def reopen_run(run_id: str) -> None:
    """Mark a run RUNNING again (a resumed experiment reuses its KILLED or FAILED runs)."""
    from mlflow import MlflowClient

    MlflowClient().update_run(run_id, status="RUNNING")


@contextlib.contextmanager
def ended_on_failure(*run_ids: str | None) -> Iterator[None]:
    """End ``run_ids`` when the block raises: KILLED for Ctrl-C, SystemExit and cancellation
    (BaseExceptions that are not Exceptions), FAILED for any other error; the error propagates.

    Runs are created with ``MlflowClient.create_run`` and ended explicitly on success,
    so without this an interrupted experiment would stay RUNNING in MLflow forever.
    """
    try:
        yield
    except BaseException as err:
        status = "FAILED" if isinstance(err, Exception) else "KILLED"
        for run_id in filter(None, run_ids):
            try:
                end_run(run_id, status)
            except Exception as mark_err:  # the original error matters more: keep it, say why the run stays RUNNING
                err.add_note(f"MLflow run {run_id} could not be marked {status}: {mark_err}")
        raise


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    from mlflow import MlflowClient

    MlflowClient().log_artifact(run_id, str(path), artifact_path)


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    names = ("torch", "numpy", "pandas", "mlflow", "ffmpeg-python", "librosa", "facenet-pytorch", "zarr", "pyarrow")
    return [f"{name}=={version(name)}" for name in names]


def log_pyfunc_model(run_id: str, checkpoint_path: str | Path, label_names: Sequence[str]) -> str:
    """Log the checkpoint as an MLflow pyfunc in ``run_id``; returns the model URI."""
    import mlflow

    from modeling.pyfunc_model import MsataPyfunc, model_signature

    signature = model_signature(label_names)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=MsataPyfunc(),
            artifacts={"checkpoint": str(checkpoint_path)},
            signature=signature,
            # Snapshot of the code the model was trained with, so it loads outside this repo.
            code_paths=[str(REPO_ROOT / "modeling"), str(REPO_ROOT / "features")],
            pip_requirements=pip_requirements(),
        )
    return info.model_uri


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: str
    champion: bool
    reason: str
    model_uri: str = ""


def _protocol(tags: dict[str, str]) -> tuple[str, ...]:
    return tuple(str(tags.get(k)) for k in PROTOCOL_TAGS)


class RegistryError(RuntimeError):
    """The registry could not be read or written: nothing was promoted."""


def current_champion(name: str) -> Any:
    """The champion ModelVersion of registered model ``name``, or None when there is none yet.

    "None yet" means exactly two things: the model is not registered, or it has no
    champion alias. Any other failure (a server or database error, an alias that
    points at a version that cannot be read) raises RegistryError, because
    treating it as "no champion" would promote whatever comes next.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases  # {alias: version}
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(f"cannot read registered model {name}: {_first_line(err)}") from err
    if CHAMPION not in aliases:
        return None
    try:
        return client.get_model_version(name, str(aliases[CHAMPION]))
    except MlflowException as err:
        raise RegistryError(f"cannot read the champion of {name} (v{aliases[CHAMPION]}): {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    text = str(getattr(err, "message", err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def register_and_promote(model_uri: str, dataset: str, tags: dict[str, Any]) -> RegistrationResult:
    """Register a version with ``tags`` (protocol + metrics) and apply the champion rule.

    The rule compares ``val_uar_mean`` (each fold's selected-epoch validation UAR,
    averaged): test metrics are reported as tags but never choose a model, not even
    the deployed one, or repeated experiments would tune on the test speakers.
    The champion is read before registering: when it cannot be read, nothing is
    registered and RegistryError says why.
    """
    import mlflow
    from mlflow import MlflowClient

    missing = [k for k in (*PROTOCOL_TAGS, "val_uar_mean") if k not in tags]
    if missing:
        raise ValueError(f"registration tags lack {missing}")
    name = model_name(dataset)
    str_tags = {k: str(v) for k, v in tags.items()}
    champion = current_champion(name)
    version = mlflow.register_model(model_uri, name, tags=str_tags)
    client = MlflowClient()
    new_uar = float(tags["val_uar_mean"])
    if champion is None:
        promote, reason = True, "first version on this registry"
    elif _protocol(champion.tags) != _protocol(str_tags):
        promote = False
        reason = f"champion v{champion.version} was evaluated on another protocol {_protocol(champion.tags)}; not comparable"
    else:
        old_uar = float(champion.tags.get("val_uar_mean", "-inf"))  # -inf: registered before the rule used it
        promote = new_uar > old_uar
        reason = f"validation UAR mean {new_uar:.4f} {'>' if promote else '<='} champion v{champion.version} {old_uar:.4f}"
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return RegistrationResult(name=name, version=str(version.version), champion=promote, reason=reason, model_uri=model_uri)


def registration_of_run(dataset: str, run_id: str) -> RegistrationResult | None:
    """The version already registered from ``run_id`` (an experiment registers one model), or None.

    It makes registration idempotent: finalizing a finished experiment again (``--resume``)
    returns the existing version instead of registering the same model a second time.
    """
    from mlflow import MlflowClient

    name = model_name(dataset)
    versions = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        return None
    first = min(versions, key=lambda mv: int(mv.version))
    champion = current_champion(name)
    is_champion = champion is not None and str(champion.version) == str(first.version)
    reason = f"already registered from run {run_id} as v{first.version}; not registered again"
    return RegistrationResult(name=name, version=str(first.version), champion=is_champion, reason=reason, model_uri=str(first.source))


def compare_models(dataset: str | None = None) -> pd.DataFrame:
    """Registered msata versions (all datasets, or one) with metrics and tags side by side."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_tracking()
    client = MlflowClient()
    if dataset is not None:
        names = [model_name(dataset)]
    else:
        names = [m.name for m in client.search_registered_models(filter_string="name LIKE 'msata-%'")]
    rows: list[dict[str, Any]] = []
    for name in names:
        try:
            aliases = client.get_registered_model(name).aliases  # {alias: version}
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # nothing registered for this dataset yet
                continue
            raise
        by_version: dict[str, list[str]] = {}
        for alias, ver in aliases.items():
            by_version.setdefault(str(ver), []).append(alias)
        for mv in client.search_model_versions(f"name='{name}'"):
            row: dict[str, Any] = {"model": name, "version": int(mv.version), "aliases": ",".join(sorted(by_version.get(str(mv.version), []))), "run_id": mv.run_id}
            for key, value in mv.tags.items():
                row[key] = _maybe_float(value)
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["model", "version", "aliases", "run_id", "test_uar_mean"])
    sort_key = "test_uar_mean" if "test_uar_mean" in frame else "version"
    return frame.sort_values(["model", sort_key], ascending=[True, False], ignore_index=True)


def _maybe_float(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    return path

