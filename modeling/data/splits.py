"""Speaker-independent evaluation protocols.

Every fold is a partition of the clips into train / val / test where no speaker
appears in two parts:

* the **test** part of fold k is the k-th group of whole speakers (speakers are
  shuffled with the seed, then dealt round-robin, so fold sizes differ by at most
  one speaker);
* the **val** part is drawn from the *training* speakers of that fold (never from
  its test speakers), with its own seeded draw; it is what early stopping and model
  choice look at, so the test fold is only ever touched once, at the end;
* a folder dataset whose manifest fixes a ``split`` for every clip is used as given
  (one fold); missing ``val`` clips are then carved out of the train speakers.

All checks that can fail (empty store, unknown labels, too few speakers, wrong
feature config) run in :func:`validate_manifest` / :func:`check_feature_config`
before any training starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features.config import FeatureConfig
from features.recipes import fixed_labels
from features.recipes.folder import SPLIT_ALIASES


class ProtocolError(ValueError):
    """The data cannot support the requested evaluation protocol."""


@dataclass(frozen=True)
class SplitConfig:
    n_folds: int = 5  # CREMA-D: 5; RAVDESS: 5 or 6 (24 actors -> 4 per fold with 6)
    val_fraction: float = 0.15  # of each fold's training speakers, at least min_val_speakers
    min_val_speakers: int = 1
    seed: int = 0
    use_given_split: bool = True  # honour a folder dataset's `split` column when every clip has one


@dataclass(frozen=True)
class Fold:
    index: int
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    train_speakers: tuple[str, ...]
    val_speakers: tuple[str, ...]
    test_speakers: tuple[str, ...]

    def assignment(self) -> dict[str, str]:
        """clip_id -> "train" | "val" | "test"."""
        out = {cid: "train" for cid in self.train_ids}
        out.update({cid: "val" for cid in self.val_ids})
        out.update({cid: "test" for cid in self.test_ids})
        return out


def resolve_label_names(dataset: str, manifest: pd.DataFrame) -> list[str]:
    """The fixed class list of a known corpus (features/recipes: the index of a label never
    depends on which clips a store holds), else the sorted labels of the store."""
    known = fixed_labels(dataset)
    if known is not None:
        return list(known)
    labels = manifest["label"].dropna().astype(str) if "label" in manifest else pd.Series([], dtype=str)
    names = sorted(set(labels) - {""})
    if not names:
        raise ProtocolError(f"dataset {dataset!r}: the store has no labelled clips")
    return names


def given_splits(manifest: pd.DataFrame) -> pd.Series | None:
    """The normalised user-given split per clip, None when no clip has one."""
    if "split" not in manifest.columns:
        return None
    raw = manifest["split"]
    if raw.isna().all() or (raw.astype(str).str.strip() == "").all():
        return None
    if raw.isna().any():
        missing = manifest.loc[raw.isna(), "clip_id"].head(5).tolist()
        raise ProtocolError(f"the `split` column is set for some clips but not for {missing} (set it for all or none)")
    normalised = raw.astype(str).str.strip().str.lower().map(SPLIT_ALIASES)
    if normalised.isna().any():
        bad = raw[normalised.isna()].iloc[0]
        raise ProtocolError(f"unknown split value {bad!r}; use one of {sorted(SPLIT_ALIASES)}")
    return pd.Series(normalised.to_numpy(), index=manifest["clip_id"].to_numpy())


def validate_manifest(manifest: pd.DataFrame, label_names: list[str], config: SplitConfig) -> None:
    """Raise ProtocolError for every condition that would make training meaningless."""
    if manifest is None or len(manifest) == 0:
        raise ProtocolError("the feature store is empty: run preprocessing first")
    for column in ("clip_id", "speaker", "label"):
        if column not in manifest.columns:
            raise ProtocolError(f"manifest has no {column!r} column (columns: {list(manifest.columns)})")
    if manifest["clip_id"].duplicated().any():
        raise ProtocolError(f"duplicate clip ids, e.g. {manifest.loc[manifest['clip_id'].duplicated(), 'clip_id'].iloc[0]!r}")
    labels = manifest["label"]
    missing = manifest.loc[labels.isna() | (labels.astype(str).str.strip() == ""), "clip_id"]
    if len(missing):
        raise ProtocolError(f"{len(missing)} clips have no label, e.g. {missing.iloc[0]!r}")
    unknown = sorted(set(labels.astype(str)) - set(label_names))
    if unknown:
        raise ProtocolError(f"labels {unknown} are not in the class list {label_names}")
    speakers = manifest["speaker"]
    if speakers.isna().any():
        raise ProtocolError(f"clip {manifest.loc[speakers.isna(), 'clip_id'].iloc[0]!r} has no speaker")
    if config.use_given_split and given_splits(manifest) is not None:
        return
    if config.n_folds < 2:
        raise ProtocolError(f"n_folds must be at least 2, got {config.n_folds}")
    n_speakers = speakers.astype(str).nunique()
    needed = config.n_folds + config.min_val_speakers
    rest = n_speakers - -(-n_speakers // config.n_folds)  # speakers outside the biggest (ceil) test fold
    if n_speakers < needed or rest - n_val_speakers(rest, config) < 1:
        raise ProtocolError(
            f"{n_speakers} speakers cannot make {config.n_folds} speaker-independent folds plus "
            f"{config.min_val_speakers} validation speaker(s) and at least one training speaker per fold: "
            f"need at least {needed + 1}"
        )


def check_feature_config(actual: FeatureConfig, expected: FeatureConfig | None) -> None:
    if expected is not None and actual.config_hash() != expected.config_hash():
        raise ProtocolError(
            f"the store was built with feature config {actual.config_hash()} but {expected.config_hash()} "
            f"was expected: store {actual.to_dict()} vs expected {expected.to_dict()}"
        )


def n_val_speakers(n_train_speakers: int, config: SplitConfig) -> int:
    """Validation speakers drawn from a fold's ``n_train_speakers`` non-test speakers."""
    return max(config.min_val_speakers, int(round(config.val_fraction * n_train_speakers)))


def _draw_val_speakers(train_speakers: list[str], config: SplitConfig, rng: np.random.Generator) -> list[str]:
    n_val = n_val_speakers(len(train_speakers), config)
    if n_val >= len(train_speakers):
        raise ProtocolError(f"{len(train_speakers)} training speakers leave none for training after {n_val} validation speakers")
    picked = rng.choice(len(train_speakers), size=n_val, replace=False)
    return sorted(train_speakers[i] for i in picked)


def _fold_from_speakers(index: int, manifest: pd.DataFrame, train_spk: list[str], val_spk: list[str], test_spk: list[str]) -> Fold:
    spk = manifest["speaker"].astype(str)

    def ids(group: list[str]) -> tuple[str, ...]:
        return tuple(sorted(manifest.loc[spk.isin(group), "clip_id"].astype(str)))

    return Fold(
        index, ids(train_spk), ids(val_spk), ids(test_spk), tuple(sorted(train_spk)), tuple(sorted(val_spk)), tuple(sorted(test_spk))
    )


def speaker_folds(manifest: pd.DataFrame, config: SplitConfig) -> list[Fold]:
    """k folds of whole speakers, each with a validation set drawn from its training speakers."""
    speakers = sorted(manifest["speaker"].astype(str).unique())
    order = np.random.default_rng(config.seed).permutation(len(speakers))
    groups: list[list[str]] = [[] for _ in range(config.n_folds)]
    for rank, idx in enumerate(order):
        groups[rank % config.n_folds].append(speakers[idx])
    folds = []
    for k, test_spk in enumerate(groups):
        rest = sorted(set(speakers) - set(test_spk))
        val_spk = _draw_val_speakers(rest, config, np.random.default_rng([config.seed, k]))
        train_spk = sorted(set(rest) - set(val_spk))
        folds.append(_fold_from_speakers(k, manifest, train_spk, val_spk, test_spk))
    return folds


def given_split_fold(manifest: pd.DataFrame, splits: pd.Series, config: SplitConfig) -> Fold:
    ids = manifest["clip_id"].astype(str)
    part = ids.map(splits)
    if not (part == "train").any() or not (part == "test").any():
        raise ProtocolError(f"a given `split` column needs train and test clips, found {sorted(set(part))}")
    if (part == "val").any():
        spk = manifest["speaker"].astype(str)
        return Fold(
            0,
            tuple(sorted(ids[part == "train"])),
            tuple(sorted(ids[part == "val"])),
            tuple(sorted(ids[part == "test"])),
            tuple(sorted(set(spk[part == "train"]))),
            tuple(sorted(set(spk[part == "val"]))),
            tuple(sorted(set(spk[part == "test"]))),
        )
    # No val given: carve it from the train speakers, keeping the user's test set intact.
    train_rows = manifest[part == "train"]
    train_speakers = sorted(train_rows["speaker"].astype(str).unique())
    val_spk = _draw_val_speakers(train_speakers, config, np.random.default_rng([config.seed, 0]))
    fold = _fold_from_speakers(0, train_rows, sorted(set(train_speakers) - set(val_spk)), val_spk, [])
    test_rows = manifest[part == "test"]
    return Fold(
        0,
        fold.train_ids,
        fold.val_ids,
        tuple(sorted(test_rows["clip_id"].astype(str))),
        fold.train_speakers,
        fold.val_speakers,
        tuple(sorted(set(test_rows["speaker"].astype(str)))),
    )


def make_folds(manifest: pd.DataFrame, config: SplitConfig) -> list[Fold]:
    splits = given_splits(manifest) if config.use_given_split else None
    if splits is not None:
        return [given_split_fold(manifest, splits, config)]
    return speaker_folds(manifest, config)


def splits_frame(folds: Iterable[Fold], manifest: pd.DataFrame) -> pd.DataFrame:
    """Long table: clip_id, speaker, label, fold, split."""
    meta = manifest.set_index(manifest["clip_id"].astype(str))[["speaker", "label"]]
    rows = []
    for fold in folds:
        for cid, part in fold.assignment().items():
            rows.append(
                {
                    "clip_id": cid,
                    "speaker": str(meta.at[cid, "speaker"]),
                    "label": str(meta.at[cid, "label"]),
                    "fold": fold.index,
                    "split": part,
                }
            )
    return pd.DataFrame(rows, columns=["clip_id", "speaker", "label", "fold", "split"]).sort_values(["fold", "clip_id"], ignore_index=True)


def export_splits(folds: list[Fold], manifest: pd.DataFrame, directory: str | Path) -> list[Path]:
    """Write splits.csv (long table) and splits.json ({fold: {clip_id: split}} + speakers)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = directory / "splits.csv", directory / "splits.json"
    splits_frame(folds, manifest).to_csv(csv_path, index=False)
    payload = {
        str(f.index): {
            "speakers": {"train": list(f.train_speakers), "val": list(f.val_speakers), "test": list(f.test_speakers)},
            "clips": f.assignment(),
        }
        for f in folds
    }
    json_path.write_text(json.dumps(payload, indent=1, sort_keys=True))
    return [csv_path, json_path]


def fold_to_dict(fold: Fold) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(fold).items()}


def fold_from_dict(data: dict) -> Fold:
    return Fold(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def split_speed_copies(manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, tuple[str, ...]]]:
    """(the recordings, source clip id -> its speed-perturbed copies' ids) of a store's manifest.

    Folds, validation, tests and every count are made of the recordings alone; a copy
    (features/speed.py) only ever joins its source in a training part (:func:`ids_with_copies`).
    A store written before copies existed has no ``source_clip_id`` column: all recordings.
    """
    if "source_clip_id" not in manifest.columns:
        return manifest, {}
    is_copy = manifest["source_clip_id"].notna()
    recordings = manifest.loc[~is_copy].reset_index(drop=True)
    copies: dict[str, list[str]] = {}
    for source, copy_id in zip(
        manifest.loc[is_copy, "source_clip_id"].astype(str), manifest.loc[is_copy, "clip_id"].astype(str), strict=True
    ):
        copies.setdefault(source, []).append(copy_id)
    return recordings, {source: tuple(sorted(ids)) for source, ids in copies.items()}


def copies_hash(copies: dict[str, tuple[str, ...]]) -> str:
    """A short fingerprint of which copies a store holds for which recordings: the experiment records it
    so that a resumed run, or a fold started later, never trains on a different set of copies."""
    return hashlib.sha256(json.dumps(sorted(copies.items())).encode()).hexdigest()[:12]


def ids_with_copies(ids: tuple[str, ...], copies: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Training clip ids followed by the copies of each (those the store holds). Ids, not records:
    features.speed.with_speed_copies makes the copies' records at preprocessing."""
    return tuple(ids) + tuple(c for cid in ids for c in copies.get(cid, ()))
