from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from features.decode import decode_audio, iter_video_frames, probe
from features.synthetic import (
    CLASS_STYLES,
    SpeakerStyle,
    class_style,
    make_synthetic_dataset,
    make_talking_face_clip,
    speaker_style,
)

SPEAKER = SpeakerStyle(base_f0=150.0)


def _median_f0(wave: np.ndarray, sr: int = 16_000) -> float:
    """Autocorrelation pitch over the loud 40 ms frames (the syllables)."""
    frame = int(0.04 * sr)
    lo, hi = int(sr / 400), int(sr / 60)
    f0s = []
    peak = np.abs(wave).max()
    for start in range(0, len(wave) - frame, frame // 2):
        x = wave[start : start + frame]
        if np.abs(x).max() < 0.5 * peak:
            continue
        x = x - x.mean()
        ac = np.correlate(x, x, "full")[frame - 1 :]
        f0s.append(sr / (lo + int(np.argmax(ac[lo:hi]))))
    assert f0s, "no voiced frame found"
    return float(np.median(f0s))


def test_clip_matches_what_was_asked(make_clip) -> None:
    clip = make_clip("asked.mp4", duration_s=0.8, fps="30000/1001", width=256, height=192, seed=2)
    info = probe(clip.path)
    assert (info.width, info.height, info.video_codec, info.audio_codec) == (256, 192, "h264", "aac")
    assert info.fps == pytest.approx(30000 / 1001)
    assert clip.n_frames == round(0.8 * 30000 / 1001) == clip.face_centers.shape[0]
    assert np.isfinite(clip.face_centers).all()
    half = clip.face_height / 2
    assert (clip.face_centers[:, 0] > 0).all() and (clip.face_centers[:, 1] > half * 0.5).all()
    # The face moves smoothly: a few pixels per frame at most.
    assert np.abs(np.diff(clip.face_centers, axis=0)).max() < 8


def test_voice_pitch_follows_class_and_speaker(make_clip) -> None:
    f0 = {}
    for label in ("happy", "sad"):
        clip = make_clip(f"pitch_{label}.m4a", duration_s=1.0, with_video=False, label=label, speaker=SPEAKER)
        f0[label] = _median_f0(decode_audio(clip.path))
        expected = SPEAKER.base_f0 * CLASS_STYLES[label].f0_ratio
        assert f0[label] == pytest.approx(expected, rel=0.15)
    assert f0["happy"] > 1.3 * f0["sad"]


def test_face_tint_follows_class(make_clip) -> None:
    redness = {}
    for label in ("angry", "sad"):
        clip = make_clip(f"tint_{label}.mp4", duration_s=0.2, fps=25, label=label, speaker=SPEAKER)
        frame = next(iter_video_frames(clip.path))[0][0].astype(float)
        cx, cy = clip.face_centers[0].astype(int)
        r = int(clip.face_height * 0.15)
        skin = frame[cy - r : cy + r, cx - r : cx + r].reshape(-1, 3).mean(0)
        redness[label] = skin[0] / skin[2]
    assert redness["angry"] > 1.2 * redness["sad"]


def test_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even frame sizes, got 321x240"):
        make_talking_face_clip(tmp_path / "odd.mp4", 0.2, 25, 321, 240)
    with pytest.raises(ValueError, match="audio, video or both"):
        make_talking_face_clip(tmp_path / "none.mp4", 0.2, with_audio=False, with_video=False)
    with pytest.raises(ValueError, match="fps must be positive"):
        make_talking_face_clip(tmp_path / "zero.mp4", 0.2, 0)


def test_unknown_labels_get_distinct_styles() -> None:
    styles = [class_style(f"label{i}", i) for i in range(5)]
    assert len({(s.f0_ratio, s.syllable_rate) for s in styles}) == 5
    assert class_style("happy", 3) == CLASS_STYLES["happy"]
    assert speaker_style(0, seed=1) == speaker_style(0, seed=1) != speaker_style(1, seed=1)


def test_dataset_layout(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path / "ds", n_speakers=2, clips_per_class=1, classes=("happy", "sad"), duration_s=0.3, size=(160, 120)
    )
    with open(root / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and set(rows[0]) == {"path", "label", "speaker"}
    assert {r["label"] for r in rows} == {"happy", "sad"} and {r["speaker"] for r in rows} == {"spk00", "spk01"}
    corners = {}
    for row in rows:
        path = root / row["path"]
        assert not Path(row["path"]).is_absolute() and path.is_file()
        info = probe(path)
        assert info.has_audio and info.has_video and (info.width, info.height) == (160, 120)
        frame = next(iter_video_frames(path, info=info))[0][0]
        corners[row["speaker"]] = frame[:8, :8].reshape(-1, 3).mean(0)
    assert np.abs(corners["spk00"] - corners["spk01"]).sum() > 20  # speakers differ in background
