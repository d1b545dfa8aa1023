"""Speaker-independent protocols: folds of whole speakers, validation from train speakers."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from features.config import AudioConfig, FeatureConfig
from modeling.data.splits import (
    ProtocolError,
    SplitConfig,
    check_feature_config,
    export_splits,
    make_folds,
    resolve_label_names,
    validate_manifest,
)

LABELS = ["angry", "disgust", "fearful", "happy", "neutral", "sad"]


def manifest(n_speakers: int, clips_per_speaker: int = 6, split: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for s in range(n_speakers):
        for c in range(clips_per_speaker):
            rows.append({"clip_id": f"s{s:02d}_c{c}", "speaker": f"s{s:02d}", "label": LABELS[c % len(LABELS)], "split": None})
    frame = pd.DataFrame(rows)
    if split is not None:
        frame["split"] = [split[int(sid[1:3])] for sid in frame["clip_id"]]
    return frame


@pytest.mark.parametrize("n_speakers,n_folds", [(91, 5), (24, 6), (24, 5), (7, 5)])
def test_folds_partition_speakers_and_clips(n_speakers: int, n_folds: int) -> None:
    m = manifest(n_speakers, 2)
    folds = make_folds(m, SplitConfig(n_folds=n_folds, seed=3))
    assert len(folds) == n_folds
    test_speakers = [set(f.test_speakers) for f in folds]
    # every speaker is in exactly one test fold; fold sizes differ by at most one speaker
    assert set().union(*test_speakers) == set(m["speaker"])
    assert sum(len(s) for s in test_speakers) == n_speakers
    assert max(map(len, test_speakers)) - min(map(len, test_speakers)) <= 1
    speaker_of = dict(zip(m["clip_id"], m["speaker"], strict=False))
    for f in folds:
        parts = [set(f.train_speakers), set(f.val_speakers), set(f.test_speakers)]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert parts[0] | parts[1] | parts[2] == set(m["speaker"])
        assert len(f.val_speakers) >= 1
        assert {speaker_of[c] for c in f.val_ids} == parts[1]
        assert {speaker_of[c] for c in f.test_ids} == parts[2]
        assert len(f.train_ids) + len(f.val_ids) + len(f.test_ids) == len(m)


def test_folds_are_deterministic_given_seed() -> None:
    m = manifest(24, 2)
    a = make_folds(m, SplitConfig(n_folds=6, seed=1))
    b = make_folds(m.sample(frac=1.0, random_state=0), SplitConfig(n_folds=6, seed=1))  # row order must not matter
    c = make_folds(m, SplitConfig(n_folds=6, seed=2))
    assert a == b
    assert [f.test_speakers for f in a] != [f.test_speakers for f in c]


def test_val_fraction_of_training_speakers() -> None:
    folds = make_folds(manifest(24, 1), SplitConfig(n_folds=6, val_fraction=0.15))
    assert all(len(f.val_speakers) == 3 for f in folds)  # round(0.15 * 20)


def test_given_split_column_is_honoured() -> None:
    split = ["train"] * 4 + ["val"] + ["test"] * 2
    m = manifest(7, 2, split)
    (fold,) = make_folds(m, SplitConfig(n_folds=5))
    assert fold.test_speakers == ("s05", "s06") and fold.val_speakers == ("s04",)
    assert set(fold.train_speakers) == {"s00", "s01", "s02", "s03"}
    # Without val clips, val speakers are carved from the train speakers only.
    m2 = manifest(6, 2, ["train"] * 4 + ["test"] * 2)
    (fold2,) = make_folds(m2, SplitConfig(n_folds=5, min_val_speakers=1))
    assert set(fold2.val_speakers) < {"s00", "s01", "s02", "s03"} and fold2.test_speakers == ("s04", "s05")
    # Ignored when asked to.
    assert len(make_folds(m, SplitConfig(n_folds=3, use_given_split=False))) == 3


def test_clear_errors_before_training() -> None:
    cfg = SplitConfig(n_folds=5)
    with pytest.raises(ProtocolError, match="empty"):
        validate_manifest(manifest(0), LABELS, cfg)
    with pytest.raises(ProtocolError, match="5 speakers cannot make 5"):
        validate_manifest(manifest(5), LABELS, cfg)
    bad = manifest(8)
    bad.loc[3, "label"] = "bored"
    with pytest.raises(ProtocolError, match="bored"):
        validate_manifest(bad, LABELS, cfg)
    bad.loc[3, "label"] = None
    with pytest.raises(ProtocolError, match="no label"):
        validate_manifest(bad, LABELS, cfg)
    partial = manifest(8)
    partial.loc[0, "split"] = "train"
    with pytest.raises(ProtocolError, match="some clips"):
        validate_manifest(partial, LABELS, cfg)
    weird = manifest(8, 1, ["holdout"] * 8)
    with pytest.raises(ProtocolError, match="holdout"):
        validate_manifest(weird, LABELS, cfg)
    validate_manifest(manifest(6), LABELS, cfg)  # 5 folds + 1 validation speaker: enough


def test_feature_config_mismatch() -> None:
    check_feature_config(FeatureConfig(), FeatureConfig())
    check_feature_config(FeatureConfig(), None)
    with pytest.raises(ProtocolError, match="feature config"):
        check_feature_config(FeatureConfig(audio=AudioConfig(n_mels=64)), FeatureConfig())


def test_label_names() -> None:
    m = manifest(2)
    assert resolve_label_names("crema_d", m) == LABELS
    assert resolve_label_names("ravdess", m)[:2] == ["neutral", "calm"]
    m.loc[0, "label"] = "zzz"
    assert resolve_label_names("folder", m) == sorted(set(LABELS) | {"zzz"})


def test_export_splits(tmp_path) -> None:
    m = manifest(7, 2)
    folds = make_folds(m, SplitConfig(n_folds=3))
    csv_path, json_path = export_splits(folds, m, tmp_path)
    table = pd.read_csv(csv_path)
    assert len(table) == 3 * len(m)
    assert set(table["split"]) == {"train", "val", "test"}
    payload = json.loads(json_path.read_text())
    assert payload["1"]["clips"] == folds[1].assignment()
    assert payload["0"]["speakers"]["test"] == list(folds[0].test_speakers)


def test_speed_copies_are_split_from_the_recordings() -> None:
    from modeling.data.splits import ids_with_copies, split_speed_copies

    manifest = pd.DataFrame(
        {
            "clip_id": ["a", "a_sp0.9", "a_sp1.1", "b"],
            "speaker": ["s1", "s1", "s1", "s2"],
            "label": ["sad"] * 4,
            "source_clip_id": [None, "a", "a", None],
        }
    )
    recordings, copies = split_speed_copies(manifest)
    assert recordings["clip_id"].tolist() == ["a", "b"] and copies == {"a": ("a_sp0.9", "a_sp1.1")}
    assert ids_with_copies(("a", "b"), copies) == ("a", "b", "a_sp0.9", "a_sp1.1")
    older = manifest.drop(columns="source_clip_id").iloc[[0, 3]]  # a store written before copies existed
    same, none = split_speed_copies(older)
    assert same is older and none == {}
