"""The MLflow model registry for msata: the logged pyfunc, registration, the champion rule.

Registry: the model is registered as ``msata-<dataset>``; each version carries the
protocol as tags (dataset, n_folds, splits_hash, feature_config_hash), its test
and validation metrics as metrics of the logged model (and, for ``msata compare``,
as tags), and a description of how it was trained. The ``champion`` alias moves to
a new version only when no champion exists or the champion was evaluated on the
same protocol, is inductive or transductive as the new one is (``speaker_norm``), and
the new validation UAR mean is strictly higher. An experiment
registers one version: finalizing it again returns that version.

One module of ~310 lines because registration, the champion rule and the version texts all read
the same protocol tags; split, each part would re-describe them.

The pyfunc is logged from code (``modeling/tracking/pyfunc_code.py``, MLflow's
models-from-code): loading it unpickles nothing, and its checkpoint artifact is
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from modeling.tracking.runs import CHAMPION, PROTOCOL_TAGS, REPO_ROOT, configure_tracking, model_name

if TYPE_CHECKING:
    from features.config import AudioEncoderConfig

METRIC_PREFIXES = ("test_", "val_", "selected_fold_val_")  # registration tags that are also the model's metrics


def pip_requirements(audio_encoder: AudioEncoderConfig | None = None) -> list[str]:
    """The logged model's pip environment: msata's runtime, plus what its audio encoder needs at
    prediction time (the pinned weight packages of a packaged encoder; transformers for a
    Hugging Face checkpoint, whose directory must exist where the model is served)."""
    from importlib.metadata import version

    names = ["torch", "numpy", "pandas", "mlflow", "ffmpeg-python", "librosa", "facenet-pytorch", "zarr", "pyarrow"]
    extra: list[str] = []
    if audio_encoder is not None and not audio_encoder.is_log_mel:
        if audio_encoder.is_hf_checkpoint:
            names += ["transformers", "safetensors"]
        else:
            from features.audio_encoders.registry import packaged_encoder

            extra = list(packaged_encoder(audio_encoder.name).pip_packages)
    return [f"{name}=={version(name)}" for name in names] + extra


def log_pyfunc_model(
    run_id: str, checkpoint_path: str | Path, label_names: Sequence[str], audio_encoder: AudioEncoderConfig | None = None
) -> str:
    """Log the checkpoint as an MLflow pyfunc (models-from-code) in ``run_id``; returns the model URI.
    ``audio_encoder`` (the model's feature config's) adds the packages it needs to the environment."""
    import mlflow

    from modeling.tracking.pyfunc_model import CODE_PATH, input_example, model_signature

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(CODE_PATH),  # models-from-code: a file MLflow runs on load, nothing cloudpickled
            artifacts={"checkpoint": str(checkpoint_path)},
            signature=model_signature(label_names),
            input_example=input_example(),
            # Snapshot of the code the model was trained with, so it loads outside this repo.
            code_paths=[str(REPO_ROOT / "modeling"), str(REPO_ROOT / "features"), str(REPO_ROOT / "storage")],  # what inference imports
            # The environment spelled out: MLflow's own conda.yaml builder warns when pip itself is
            # not installed (a uv environment), at every registration.
            conda_env={
                "name": "msata",
                "channels": ["conda-forge"],
                "dependencies": [f"python={platform.python_version()}", "pip", {"pip": pip_requirements(audio_encoder)}],
            },
            metadata={"label_names": list(label_names)},
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


def _inference(tags: dict[str, str]) -> str:
    """ "transductive" for a model that standardises each speaker with that speaker's unlabelled clips
    (train.speaker_norm), else "inductive"; versions registered before the tag existed count as inductive."""
    return "transductive" if str(tags.get("speaker_norm")) == "True" else "inductive"


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
    elif _inference(champion.tags) != _inference(str_tags):
        # Reported apart (docs/results.md): a transductive figure never takes the place of an inductive one, or back.
        promote = False
        reason = f"champion v{champion.version} is {_inference(champion.tags)}, this version {_inference(str_tags)}; not comparable"
    else:
        old_uar = float(champion.tags.get("val_uar_mean", "-inf"))  # -inf: registered before the rule used it
        promote = new_uar > old_uar
        reason = f"validation UAR mean {new_uar:.4f} {'>' if promote else '<='} champion v{champion.version} {old_uar:.4f}"
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.update_registered_model(name, description=model_description(dataset))
    client.update_model_version(name, version.version, description=version_description(str_tags, reason, promote))
    _log_model_metrics(model_uri, tags)
    return RegistrationResult(name=name, version=str(version.version), champion=promote, reason=reason, model_uri=model_uri)


def register_experiment_model(
    spec: dict[str, Any], parent_run_id: str, selected: Any, folds: Sequence[Any], summary: dict[str, float]
) -> RegistrationResult:
    """Log the selected fold's model in the experiment's parent run and register it, once.

    Finalizing an experiment that already registered (``--resume`` of a finished
    one) returns that version: nothing is logged or registered again.
    """
    import numpy as np

    existing = registration_of_run(spec["dataset"], parent_run_id)
    if existing is not None:
        return existing
    from features.config import FeatureConfig

    audio_encoder = FeatureConfig.from_dict(spec["feature_config"]).audio_encoder
    model_uri = log_pyfunc_model(parent_run_id, selected.best_path, spec["label_names"], audio_encoder)
    tags = {
        "dataset": spec["dataset"],
        "n_folds": len(spec["folds"]),
        "splits_hash": spec["splits_hash"],
        "feature_config_hash": spec["feature_config_hash"],
        "protocol": spec["protocol"],
        "selected_fold": selected.index,
        "selected_fold_val_uar": selected.shipped_val_uar,  # with a pooled probe: the mixture's, the model that ships
        "refit": bool(spec["train"].get("refit", False)),  # the model was retrained on training + validation speakers
        "speaker_norm": bool(spec["train"].get("speaker_norm", False)),  # transductive: never compared with inductive versions
        "val_uar_mean": float(np.mean([f.shipped_val_uar for f in folds])),
        "probe_weight": float(spec["train"].get("probe_weight", 0.0)),  # > 0: a pooled-statistics probe is mixed in
        "probe_mix": str(spec["train"].get("probe_mix", "mean")),
        "parent_run_id": parent_run_id,
        **{f"test_{k}": v for k, v in summary.items()},
    }
    return register_and_promote(model_uri, spec["dataset"], tags)


def model_description(dataset: str) -> str:
    return (
        f"msata emotion recognition trained on {dataset}: one transformer over timestamped audio (log-mel) and face tokens "
        "(TaRoPE positions, cross-temporal matching loss). Input: a DataFrame with a 'path' column of audio or video files; "
        "output: one row per file with label, prob_<class>, n_windows, modalities, duration_s, warnings, error (null when it worked). "
        f"The '{CHAMPION}' alias is the version with the best validation UAR mean on the same protocol."
    )


def probe_phrase(tags: dict[str, Any]) -> str:
    """Words for a version whose model mixes in a pooled probe (train.probe_weight), else nothing."""
    try:
        weight = float(tags.get("probe_weight", 0.0))
    except (TypeError, ValueError):
        return ""
    if weight <= 0:
        return ""
    return f", with a logistic regression on pooled audio statistics mixed in ({tags.get('probe_mix', 'mean')}, weight {weight:g})"


def version_description(tags: dict[str, str], reason: str, champion: bool) -> str:
    def num(key: str) -> str:
        value = tags.get(key)
        try:
            return f"{float(value):.3f}"
        except (TypeError, ValueError):
            return "n/a"

    text = (
        f"{tags.get('protocol', str(tags.get('n_folds')) + '-fold')} cross-validation on {tags['dataset']} (splits {tags['splits_hash']}, "
        f"features {tags['feature_config_hash']}); fold {tags.get('selected_fold', '?')}'s model, chosen on validation"
        f"{', then retrained on training + validation speakers up to its chosen epoch' if str(tags.get('refit')) == 'True' else ''}"
        f"{probe_phrase(tags)}. "
        f"validation UAR mean {num('val_uar_mean')}; test UAR {num('test_uar_mean')} +- {num('test_uar_std')}, "
        f"WA {num('test_wa_mean')} +- {num('test_wa_std')}. "
    )
    if tags.get("parent_run_id"):
        text += f"MLflow run {tags['parent_run_id']}. "
    return text + f"{'Champion' if champion else 'Not champion'}: {reason}."


def _log_model_metrics(model_uri: str, tags: dict[str, Any]) -> None:
    """Numeric test/validation figures as metrics of the logged model (shown on the version page)."""
    from mlflow import MlflowClient, get_logged_model
    from mlflow.entities import Metric

    if not model_uri.startswith("models:/m-"):  # a runs:/ URI or a registered name: no logged model to attach to
        return
    logged = get_logged_model(model_uri.removeprefix("models:/"))
    now = int(time.time() * 1000)
    metrics = []
    for key, value in tags.items():
        if key.startswith(METRIC_PREFIXES) and isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.append(Metric(key, float(value), now, 0, model_id=logged.model_id, run_id=logged.source_run_id))
    if metrics and logged.source_run_id:
        MlflowClient().log_batch(logged.source_run_id, metrics=metrics)


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
            row: dict[str, Any] = {
                "model": name,
                "version": int(mv.version),
                "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                "run_id": mv.run_id,
            }
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
