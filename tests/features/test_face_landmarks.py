"""Blendshape face features: the pinned MediaPipe bundle, and real CREMA-D clips stored as 52 scores per frame."""

from __future__ import annotations

import numpy as np
import pytest

from features import face_landmarks
from features.config import FaceConfig, FeatureConfig
from features.manifest import ClipRecord

BLENDSHAPES = FeatureConfig(face=FaceConfig(representation="blendshapes"))


def test_bundle_is_checked_before_use(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(face_landmarks.load_task_bytes()) == 3_758_596
    monkeypatch.setattr(face_landmarks, "TASK_SHA256", "0" * 64)
    with pytest.raises(face_landmarks.FaceModelError, match="sha256 64184e229b263107"):
        face_landmarks.BlendshapeExtractor()


def test_representation_is_part_of_the_config_hash_and_checked() -> None:
    assert FeatureConfig().config_hash() == "3131041d0443"  # crop stores keep the hash they had before the choice existed
    assert BLENDSHAPES.config_hash() != FeatureConfig().config_hash()
    assert FeatureConfig.from_dict(BLENDSHAPES.to_dict()) == BLENDSHAPES
    with pytest.raises(ValueError, match="'mesh'"):
        FaceConfig(representation="mesh")
    stale = BLENDSHAPES.to_dict()
    stale["face"]["landmarker_sha256"] = "f" * 64
    with pytest.raises(ValueError, match="sha256 ffffffffffff"):
        FeatureConfig.from_dict(stale)


def test_no_face_gives_mask_zero_and_zero_scores() -> None:
    frames = np.full((3, 120, 160, 3), 90, np.uint8)  # flat grey: no face
    track = face_landmarks.BlendshapeExtractor().track([(frames, np.array([0.0, 0.04, 0.08]))])
    assert track.blendshapes.shape == (3, 52) and not track.mask.any() and not track.blendshapes.any()
    np.testing.assert_array_equal(track.times, [0.0, 0.04, 0.08])


@pytest.mark.slow
@pytest.mark.shared_data
def test_crema_d_clip_stored_as_blendshapes(shared_data, tmp_path) -> None:
    from features.extract import extract_clip
    from storage.feature_store import FeatureStore

    video = shared_data / "crema_d_sample" / "VideoFlash" / "1001_DFA_HAP_XX.flv"
    if not video.exists():
        pytest.skip(f"{video} not found")
    record = ClipRecord(clip_id="1001_DFA_HAP_XX", dataset="crema-d", speaker="1001", label="happy",
                        audio_path=str(video), video_path=str(video))  # fmt: skip
    features = extract_clip(record, BLENDSHAPES)
    store = FeatureStore.create(tmp_path / "store", BLENDSHAPES)
    store.write(record, features)
    back = store.read(record.clip_id)
    n = len(back.video_times)
    assert back.face_crops is None and back.face_blendshapes.shape == (n, 52) and back.face_blendshapes.dtype == np.float32
    assert back.face_mask.shape == (n,) and back.face_mask.mean() > 0.9  # a frontal face in every frame
    assert np.all(np.diff(back.video_times) > 0) and abs(np.median(np.diff(back.video_times)) - 1 / 29.97) < 1e-3
    assert np.all(back.face_blendshapes[~back.face_mask] == 0) and 0 <= back.face_blendshapes.min() <= back.face_blendshapes.max() <= 1
    smile = back.face_blendshapes[back.face_mask][
        :, [face_landmarks.BLENDSHAPE_NAMES.index(k) for k in ("mouthSmileLeft", "mouthSmileRight")]
    ]
    assert smile.mean() > 0.3  # the happy take smiles (measured 0.62)
    row = store.manifest().iloc[0]
    assert bool(row.has_video) and row.n_video_frames == n
