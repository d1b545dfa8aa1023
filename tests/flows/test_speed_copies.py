"""Speed-perturbed training copies end to end: `msata preprocess --speed-perturb` stores them as clips
of their own, and training gives each fold's training speakers their copies and nobody else."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flow_servers import MSATA, REPO, clean_env, preprocess_synthetic

from storage import FeatureStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store_with_copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return preprocess_synthetic(tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("cli"), "--speed-perturb", "0.9,1.1")


def test_copies_are_stored_beside_their_recordings(store_with_copies: Path) -> None:
    from modeling.data.splits import split_speed_copies

    store = FeatureStore.open(store_with_copies)
    manifest = store.manifest()
    recordings, copies = split_speed_copies(manifest)
    assert len(recordings) == 8 and len(manifest) == 24 and recordings["speed"].isna().all()
    assert sorted(copies) == sorted(recordings["clip_id"]) and all(len(c) == 2 for c in copies.values())
    rows = manifest.set_index("clip_id")
    for source, (slow, fast) in copies.items():
        assert (slow, fast) == (f"{source}_sp0.9", f"{source}_sp1.1")
        assert rows.loc[slow, "speed"] == "0.9" and rows.loc[fast, "source_clip_id"] == source
        assert rows.loc[slow, ["speaker", "label"]].tolist() == rows.loc[source, ["speaker", "label"]].tolist()
        n = rows.loc[source, "n_audio_frames"]
        assert abs(rows.loc[slow, "n_audio_frames"] - n / 0.9) <= 2 and abs(rows.loc[fast, "n_audio_frames"] - n / 1.1) <= 2
        assert rows.loc[fast, "duration_s"] == pytest.approx(rows.loc[source, "duration_s"] / 1.1, abs=0.02)


def test_copies_hold_their_recordings_faces_sooner(store_with_copies: Path) -> None:
    """Each copy's faces are its recording's frames, their times divided by the speed (taken from the stored recording
    when it was there, detected again otherwise: the same arrays either way)."""
    store = FeatureStore.open(store_with_copies)
    rows = store.manifest().set_index("clip_id")
    copies = rows[rows["source_clip_id"].notna()]
    assert len(copies) == 16 and copies["has_video"].all()
    for copy_id, row in copies.iterrows():
        copy, source = store.read(copy_id), store.read(row["source_clip_id"])
        np.testing.assert_array_equal(copy.video_times, source.video_times / float(row["speed"]))
        for name in ("face_crops", "face_mask", "face_boxes", "face_landmarks", "face_probs"):
            np.testing.assert_array_equal(getattr(copy, name), getattr(source, name), err_msg=f"{copy_id} {name}")


def test_a_copy_takes_its_stored_recordings_faces_without_detecting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.preprocess as preprocess
    from features.config import FeatureConfig
    from features.extract import extract_clip
    from features.faces import FaceDetector
    from features.manifest import ClipRecord
    from features.speed import speed_copy
    from features.synthetic import make_talking_face_clip

    path = tmp_path / "talk.mp4"
    make_talking_face_clip(path, duration_s=1.0, width=160, height=120, label="happy", seed=5)
    record = ClipRecord(clip_id="talk", dataset="folder", speaker="s1", label="happy", audio_path=str(path), video_path=str(path))
    config, store_path = FeatureConfig(), str(tmp_path / "store")
    assert preprocess.process_clip(record, store_path, config).status == "done"
    copy = speed_copy(record, 1.1)
    detected = extract_clip(copy, config, FaceDetector(config.face))  # what the copy was before it could take its recording's faces

    store = FeatureStore.open(store_path)
    assert preprocess.recording_faces(store, copy, config) is not None
    moved = replace(copy, audio_path=str(tmp_path / "moved.mp4"), video_path=str(tmp_path / "moved.mp4"))
    assert preprocess.recording_faces(store, moved, config) is None  # stored from another file: detected again

    def no_detection(*args, **kwargs):
        raise AssertionError("the copy decoded or detected faces although its recording's faces are stored")

    monkeypatch.setattr(preprocess, "_detector", no_detection)
    monkeypatch.setattr("features.extract.iter_video_frames", no_detection)  # nor any decoding of the frames
    assert preprocess.process_clip(copy, store_path, config).status == "done"
    stored = FeatureStore.open(store_path).read(copy.clip_id)
    assert stored.duration_s == detected.duration_s
    for name in ("logmel", "audio_times", "face_crops", "video_times", "face_mask", "face_boxes", "face_landmarks", "face_probs"):
        np.testing.assert_array_equal(getattr(stored, name), getattr(detected, name), err_msg=name)


def test_training_uses_copies_of_training_speakers_only(store_with_copies: Path, tmp_path: Path) -> None:
    from modeling.data.splits import ProtocolError, SplitConfig
    from modeling.training.experiment import prepare_experiment
    from modeling.training.experiment_spec import load_spec
    from modeling.training.fold_run import loaders
    from modeling.training.run_logger import NullRunLogger
    from modeling.training.train_loop import TrainConfig

    train = TrainConfig(epochs=1, batch_size=4, num_workers=0, max_duration_s=1.0)
    common = dict(split_config=SplitConfig(n_folds=2), logger=NullRunLogger())
    run_dir = prepare_experiment(
        str(store_with_copies), "folder", train, run_dir=tmp_path / "with", data_overrides={"speed_copies": True}, **common
    )
    plain_dir = prepare_experiment(str(store_with_copies), "folder", train, run_dir=tmp_path / "plain", **common)
    spec, plain = load_spec(run_dir), load_spec(plain_dir)
    assert spec.data.speed_copies and not plain.data.speed_copies
    assert spec.folds == plain.folds and spec.splits_hash == plain.splits_hash  # the same protocol: copies are not clips of the folds
    assert spec.run_key() != plain.run_key()
    copy_ids = set(FeatureStore.open(store_with_copies).manifest().dropna(subset=["source_clip_id"])["clip_id"])
    assert len(copy_ids) == 16
    for fold in spec.folds:
        assert not copy_ids & set(fold.train_ids + fold.val_ids + fold.test_ids)
        train_loader, val_loader, test_loader, make_loader = loaders(spec, fold, spec.train)
        expected = set(fold.train_ids) | {f"{c}_sp{s}" for c in fold.train_ids for s in ("0.9", "1.1")}
        assert set(train_loader.dataset.clip_ids) == expected
        assert list(val_loader.dataset.clip_ids) == list(fold.val_ids) and list(test_loader.dataset.clip_ids) == list(fold.test_ids)
        refit_ids = set(make_loader(fold.train_ids + fold.val_ids, True, 0).dataset.clip_ids)
        assert refit_ids == expected | set(fold.val_ids) | {f"{c}_sp{s}" for c in fold.val_ids for s in ("0.9", "1.1")}
        plain_train, *_ = loaders(plain, fold, plain.train)
        assert set(plain_train.dataset.clip_ids) == set(fold.train_ids)
    with pytest.raises(ProtocolError, match="speaker_norm"):
        prepare_experiment(
            str(store_with_copies),
            "folder",
            TrainConfig(epochs=1, speaker_norm=True),
            run_dir=tmp_path / "x",
            data_overrides={"speed_copies": True},
            **common,
        )


def test_a_run_records_its_copies_and_never_trains_on_others(store_with_copies: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from modeling.data.splits import ProtocolError, SplitConfig, copies_hash, split_speed_copies
    from modeling.training.experiment import prepare_experiment
    from modeling.training.experiment_spec import load_spec
    from modeling.training.fold_run import loaders
    from modeling.training.run_logger import NullRunLogger
    from modeling.training.train_loop import TrainConfig

    train = TrainConfig(epochs=1, batch_size=4, num_workers=0, max_duration_s=1.0)
    common = dict(split_config=SplitConfig(n_folds=2), logger=NullRunLogger(), data_overrides={"speed_copies": True})
    run_dir = prepare_experiment(str(store_with_copies), "folder", train, run_dir=tmp_path / "run", **common)
    spec = load_spec(run_dir)
    _, copies = split_speed_copies(FeatureStore.open(store_with_copies).manifest())
    assert spec.copies_hash == copies_hash(copies)
    fewer = {k: v[:1] for k, v in copies.items()}  # as if the store had lost its 1.1x copies
    assert copies_hash(fewer) != spec.copies_hash
    # The store a run began with changed under it: a fold refuses to train, and so does --resume.
    changed = replace(spec, copies_hash=copies_hash(fewer))
    with pytest.raises(ProtocolError, match="speed copies changed since the experiment began"):
        loaders(changed, changed.folds[0], changed.train)
    changed.write(run_dir)
    with pytest.raises(ProtocolError, match="speed copies changed since the run began"):
        prepare_experiment(str(store_with_copies), "folder", train, run_dir=run_dir, resume=True, **common)
    spec.write(run_dir)  # unchanged: the resume goes on
    assert (
        load_spec(prepare_experiment(str(store_with_copies), "folder", train, run_dir=run_dir, resume=True, **common)).copies_hash
        == spec.copies_hash
    )


def test_asking_for_copies_a_store_does_not_hold_is_one_line(tmp_path: Path) -> None:
    store = preprocess_synthetic(tmp_path / "raw", tmp_path / "cli")
    config = tmp_path / "copies.toml"
    config.write_text("[train]\nepochs = 1\nbatch_size = 4\n\n[data]\nspeed_copies = true\n\n[splits]\nn_folds = 2\n")
    done = subprocess.run(
        [MSATA, "train", "--store", str(store), "--dataset", "folder", "--config", str(config), "--run-dir", str(tmp_path / "run")],
        env=clean_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0 and "holds no speed-perturbed copies" in done.stderr and "--speed-perturb" in done.stderr, done.stderr[
        -2000:
    ]
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(("value", "message"), [("1.0", "factor 1 is the clip itself"), ("0.9,x", "'x' is not a number"), ("4", "outside")])
def test_a_bad_speed_factor_is_one_line_before_any_work(tmp_path: Path, value: str, message: str) -> None:
    args = ["preprocess", "--dataset", "folder", "--root", str(tmp_path), "--store", str(tmp_path / "s"), "--speed-perturb", value]
    done = subprocess.run([MSATA, *args], env=clean_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "s").exists()
