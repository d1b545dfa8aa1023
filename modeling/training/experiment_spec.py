"""The experiment spec: everything a cross-validation run was asked for, typed, in one place.

:func:`modeling.training.experiment.prepare_experiment` builds an :class:`ExperimentSpec`
and writes it to the run directory as ``experiment.json``; every later step (each fold, in
this process or a torchrun worker, then the finalize step) reads it back with
:func:`load_spec`. The configs inside are the dataclasses the code uses, so a default
lives in its dataclass only:

* ``train``: :class:`~modeling.training.train_loop.TrainConfig` (optimisation, crop length,
  caching, workers, seed);
* ``data``: :class:`~modeling.data.examples.DataConfig`, the loaders' settings: the fields it
  shares with ``TrainConfig`` always come from ``train``; the augmentation fields
  (``AUGMENT_FIELDS``: SpecAugment masks, face-crop jitter) come from the run config's
  ``[data]`` table (``msata train --config``, the flow parameter ``data``);
* ``splits``: :class:`~modeling.data.splits.SplitConfig`; ``folds``: the folds it made;
* ``model``: :class:`~modeling.network.encoder.MsataConfig`, with the input sizes the store dictates;
* ``feature_config``: the store's :class:`~features.config.FeatureConfig`.

The file keeps the keys of the untyped dict it replaces (``store_path``, ``dataset``,
``label_names``, ``train``, ``splits``, ``model``, ``feature_config``, ``feature_config_hash``,
``splits_hash``, ``protocol``, ``folds``, ``modalities``, ``mlflow``), plus ``data``: run
directories written before still load and resume (a spec without ``data`` gets the
defaults, one without ``modalities`` means both streams).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from features.config import FeatureConfig
from features.config_keys import reject_unknown_keys
from modeling.data import splits as sp
from modeling.data.examples import AUGMENT_FIELDS, LATER_DATA_DEFAULTS, DataConfig, model_input_settings
from modeling.network.encoder import LATER_MODEL_DEFAULTS, MsataConfig
from modeling.training.run_dir import SPEC_FILE, write_json
from modeling.training.run_logger import MlflowRef
from modeling.training.train_loop import TrainConfig

# Left out of the run key, so a resume may change them (a run can go on on a machine with other cores or memory).
# cache_bytes changes no value. num_workers does change the torch RNG's draws (a DataLoader draws its workers' base seed
# once per iterator, and persistent workers make one iterator per run instead of one per epoch), so dropout masks after
# a change differ from the run that kept its count: a resumed run is then a valid run of the recipe, not bit-for-bit it.
RESUME_MAY_CHANGE_TRAIN_KEYS = ("num_workers", "cache_bytes")
# Training settings added after run keys were first written, at the value every older run trained with:
# left out of the key at that value, so the run directories of older experiments keep their names (and
# `--resume` finds them), and filled in with it when an older spec lacks the setting (whatever
# TrainConfig's default is by then).
LATER_TRAIN_DEFAULTS = {
    "refit": False,
    "ctm_schedule": "constant",
    "ema_decay": 0.0,
    "probe_weight": 0.0,
    "probe_mix": "mean",
    "mixup_alpha": 0.0,
    "members": 1,
}


def data_overrides(data: dict[str, Any] | None) -> dict[str, Any]:
    """A run config's ``[data]`` table, checked: only the augmentation fields (the others are ``[train]``'s)."""
    data = dict(data or {})
    shared = {f.name for f in fields(DataConfig)} - set(AUGMENT_FIELDS)
    misplaced = sorted(set(data) & shared)
    if misplaced:
        raise ValueError(f"data settings {misplaced} are set in [train] (TrainConfig), not [data]")
    reject_unknown_keys(data, AUGMENT_FIELDS, "data")
    return data


def build_model_config(overrides: dict[str, Any] | None, feature_config: FeatureConfig, n_classes: int) -> dict[str, Any]:
    """A run config's ``[model]`` table with what the store and the labels force (input widths, classes), checked.
    Here rather than in ``experiment`` so that code without a Zarr store (``bench/gpu_ravdess.py`` on a bare GPU
    machine) builds models the way ``msata train`` does."""
    forced = {"n_classes": n_classes, **model_input_settings(feature_config)}
    overrides = dict(overrides or {})
    clashes = {k: (overrides[k], v) for k, v in forced.items() if k in overrides and overrides[k] != v}
    if clashes:
        raise sp.ProtocolError(f"model settings contradict the store/labels (given, required): {clashes}")
    return MsataConfig.from_dict({**overrides, **forced}).to_dict()


def make_data_config(train: TrainConfig, data: dict[str, Any] | None = None) -> DataConfig:
    """The loaders' settings: ``train``'s shared fields, the augmentation fields from ``data`` (defaults otherwise)."""
    return replace(train.data_config(), **data_overrides(data))


def augmentation(data: DataConfig) -> dict[str, Any]:
    """The ``[data]`` settings, less those at their LATER_DATA_DEFAULTS value (older specs' form)."""
    values = {name: getattr(data, name) for name in AUGMENT_FIELDS}
    return {k: v for k, v in values.items() if not (k in LATER_DATA_DEFAULTS and v == LATER_DATA_DEFAULTS[k])}


@dataclass
class ExperimentSpec:
    store_path: str
    dataset: str  # canonical name (features.recipes)
    label_names: list[str]
    train: TrainConfig
    data: DataConfig
    splits: sp.SplitConfig
    model: MsataConfig
    feature_config: FeatureConfig
    feature_config_hash: str
    splits_hash: str
    protocol: str
    folds: list[sp.Fold]
    modalities: list[str] | None = None  # None in specs written before it was recorded: inference assumes both
    mlflow: MlflowRef | None = None
    # [data] speed_copies: which copies of which recordings the store held (splits.copies_hash), so a
    # resume or a later fold never trains on others; None without copies and in older specs.
    copies_hash: str | None = None

    @property
    def parent_run_id(self) -> str | None:
        """The experiment-level run's id; None when the experiment was never tracked."""
        return self.mlflow.parent_run_id if self.mlflow else None

    def run_key(self) -> str:
        """The default run directory's name: store, dataset, model, features, folds and the
        settings results depend on. Default augmentation leaves the key of older specs unchanged."""
        train_key = {
            k: v
            for k, v in self.train.to_dict().items()
            if k not in RESUME_MAY_CHANGE_TRAIN_KEYS and not (k in LATER_TRAIN_DEFAULTS and v == LATER_TRAIN_DEFAULTS[k])
        }
        data = self.to_dict()
        model_key = {k: v for k, v in data["model"].items() if not (k in LATER_MODEL_DEFAULTS and v == LATER_MODEL_DEFAULTS[k])}
        keyed = {k: data[k] for k in ("store_path", "dataset", "feature_config_hash", "splits_hash")} | {
            "model": model_key,
            "train": train_key,
        }
        if self.data_is_custom():
            keyed["data"] = augmentation(self.data)
        return _hash(keyed)

    def data_is_custom(self) -> bool:
        """Whether the augmentation differs from ``DataConfig``'s defaults (a ``[data]`` table was given)."""
        return augmentation(self.data) != augmentation(DataConfig())

    def resumed_with(self, train: TrainConfig) -> ExperimentSpec:
        """This spec with the settings a resume may change (workers, cache size) taken from ``train``."""
        new_train = replace(self.train, num_workers=train.num_workers, cache_bytes=train.cache_bytes)
        return replace(self, train=new_train, data=replace(self.data, cache_bytes=train.cache_bytes))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``experiment.json``); the keys of the dict it replaced, plus ``data``."""
        return {
            "store_path": self.store_path,
            "dataset": self.dataset,
            "label_names": list(self.label_names),
            "train": self.train.to_dict(),
            "data": augmentation(self.data),
            "splits": asdict(self.splits),
            "model": self.model.to_dict(),
            "feature_config": self.feature_config.to_dict(),
            "feature_config_hash": self.feature_config_hash,
            "splits_hash": self.splits_hash,
            "protocol": self.protocol,
            "folds": [sp.fold_to_dict(f) for f in self.folds],
            "modalities": self.modalities,
            "mlflow": asdict(self.mlflow) if self.mlflow else None,
            "copies_hash": self.copies_hash,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentSpec:
        train = TrainConfig.from_dict(LATER_TRAIN_DEFAULTS | data["train"])
        mlflow = data.get("mlflow")
        return cls(
            store_path=data["store_path"],
            dataset=data["dataset"],
            label_names=list(data["label_names"]),
            train=train,
            data=make_data_config(train, data.get("data")),
            splits=sp.SplitConfig(**data["splits"]),
            model=MsataConfig.from_dict(data["model"]),
            feature_config=FeatureConfig.from_dict(data["feature_config"]),
            feature_config_hash=data["feature_config_hash"],
            splits_hash=data["splits_hash"],
            protocol=data["protocol"],
            folds=[sp.fold_from_dict(d) for d in data["folds"]],
            modalities=data.get("modalities"),
            mlflow=MlflowRef(**mlflow) if mlflow else None,
            copies_hash=data.get("copies_hash"),
        )

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / SPEC_FILE
        write_json(path, self.to_dict())
        return path


def load_spec(run_dir: str | Path) -> ExperimentSpec:
    path = Path(run_dir) / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run prepare_experiment first")
    return ExperimentSpec.from_dict(json.loads(path.read_text()))


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
