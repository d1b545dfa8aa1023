"""Where a model comes from: a checkpoint file, a training folder, an MLflow model folder or URI."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
# In a training fold's folder, the model the fold tested and registered, first match wins: with
# train.probe_weight the model with its probe, with train.members the seed ensemble, with train.refit the refit
# model, else the one chosen on validation.
FOLD_MODELS = ("probed.pt", "ensemble.pt", "refit/best.pt", "best.pt")


def is_mlflow_uri(model: str) -> bool:
    return model.startswith(("models:/", "runs:/")) or "://" in model


def find_checkpoint(folder: str | Path) -> Path:
    """The checkpoint inside a folder: an MLflow model's ``checkpoint`` artifact (from its
    MLmodel file), else the model a training fold's folder tested (:data:`FOLD_MODELS`), else the only checkpoint file."""
    import yaml

    folder = Path(folder)
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        artifact = (flavor.get("artifacts") or {}).get("checkpoint") or {}
        if artifact.get("path") and (folder / artifact["path"]).is_file():
            return folder / artifact["path"]
    for name in FOLD_MODELS:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.rglob("*") if p.suffix in _CHECKPOINT_SUFFIXES and p.is_file())
    if len(found) != 1:
        listing = ", ".join(str(p.relative_to(folder)) for p in found[:10]) or "none"
        raise ValueError(f"{folder}: expected one checkpoint file ({'/'.join(_CHECKPOINT_SUFFIXES)}), found {len(found)}: {listing}")
    return found[0]


@contextlib.contextmanager
def resolve_checkpoint(model: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """Local checkpoint path for a path or MLflow URI; downloads live only inside the ``with``.

    MLflow URIs use ``tracking_uri``, else the project's tracking configuration
    (``MLFLOW_TRACKING_URI`` or the SQLite store under ``MSATA_HOME``).
    """
    if not is_mlflow_uri(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model {model!r}: no such checkpoint file or model folder")
        yield find_checkpoint(path) if path.is_dir() else path
        return
    from mlflow.exceptions import MlflowException

    from modeling.tracking.runs import configure_tracking

    # MLflow resolves a models:/ URI's alias or version through its process-wide registry URI, whatever
    # download_artifacts is given: without this, a fresh `msata predict` looked in MLflow's own default
    # (./mlflow.db of the working directory) instead of msata's store under MSATA_HOME.
    uri = configure_tracking(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="msata-model-") as tmp:
        try:
            local = Path(mlflow_download(model, tmp, uri))
        except MlflowException as err:
            raise ValueError(f"cannot load MLflow model {model!r} from {uri}: {err.message}") from err
        try:
            yield find_checkpoint(local) if local.is_dir() else local
        except ValueError as err:
            raise ValueError(f"MLflow model {model!r}: {err}") from err


def mlflow_download(uri: str, dst: str, tracking_uri: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri, registry_uri=tracking_uri)
