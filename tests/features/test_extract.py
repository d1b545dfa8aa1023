from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.clip import ClipError
from features.config import FaceConfig, FeatureConfig
from features.extract import extract_clip
from features.faces import FaceDetector
from features.manifest import ClipRecord

CFG = FeatureConfig()


def _record(audio: Path | str | None, video: Path | str | None, clip_id: str = "c1") -> ClipRecord:
    return ClipRecord(
        clip_id=clip_id,
        dataset="synthetic",
        speaker="spk00",
        label="happy",
        audio_path=None if audio is None else str(audio),
        video_path=None if video is None else str(video),
    )


@pytest.mark.slow
def test_audio_visual_clip(make_clip, detector: FaceDetector) -> None:
    clip = make_clip("av.mp4", duration_s=1.2, fps=25, width=320, height=240, label="sad", seed=11)
    f = extract_clip(_record(clip.path, clip.path), CFG, detector)
    assert f.clip_id == "c1" and f.notes == []
    assert f.logmel.shape == (60, 80) and f.logmel.dtype == np.float32  # 1.2 s at 50 frames/s
    np.testing.assert_allclose(f.audio_times, 0.02 * np.arange(60) + 0.01)
    assert f.face_crops.shape == (30, 96, 96, 3) and f.face_crops.dtype == np.uint8
    np.testing.assert_allclose(f.video_times, np.arange(30) / 25, atol=1e-3)
    assert f.face_mask.dtype == bool and f.face_ratio >= 0.95
    assert f.face_boxes.shape == (30, 4) and f.face_landmarks.shape == (30, 5, 2) and f.face_probs.shape == (30,)
    assert f.face_boxes.dtype == f.face_landmarks.dtype == f.face_probs.dtype == np.float32
    assert f.duration_s == pytest.approx(1.2, abs=0.01)
    # Both modalities describe the same span of time.
    assert abs(f.audio_times[-1] - f.video_times[-1]) < 0.05


def test_video_without_audio_is_kept_video_only(make_clip, detector: FaceDetector) -> None:
    clip = make_clip("silent_small.mp4", duration_s=0.3, fps=25, width=320, height=240, with_audio=False)
    f = extract_clip(_record(clip.path, clip.path), CFG, detector)
    assert not f.has_audio and f.has_video and len(f.video_times) == clip.n_frames
    assert any("no audio stream" in n and "video-only" in n for n in f.notes)


def test_audio_only_file(make_clip, detector: FaceDetector) -> None:
    clip = make_clip("voice.m4a", duration_s=0.5, with_video=False)
    f = extract_clip(_record(clip.path, clip.path), CFG, detector)
    assert f.has_audio and not f.has_video and f.logmel.shape == (25, 80)
    assert any("no video stream" in n for n in f.notes)
    with pytest.raises(ClipError, match="voice.m4a: no usable audio or video stream"):
        extract_clip(_record(None, clip.path), CFG, detector)
    only_audio = extract_clip(_record(clip.path, None), CFG)  # no detector needed or built
    assert only_audio.has_audio and only_audio.notes == []


def test_no_face_anywhere_keeps_audio(make_clip, detector: FaceDetector) -> None:
    clip = make_clip("empty_room.mp4", duration_s=0.4, fps=25, width=320, height=240, blank_frames=range(10))
    f = extract_clip(_record(clip.path, clip.path), CFG, detector)
    assert f.has_audio and not f.has_video and f.face_mask is None
    assert any("no face in any of the 10 frames" in n for n in f.notes)
    silent = make_clip("empty_silent.mp4", duration_s=0.4, fps=25, width=320, height=240, blank_frames=range(10), with_audio=False)
    with pytest.raises(ClipError, match="empty_silent.mp4: nothing usable: .*no face"):
        extract_clip(_record(silent.path, silent.path), CFG, detector)


def test_broken_inputs(tmp_path: Path, make_clip, detector: FaceDetector) -> None:
    with pytest.raises(ClipError, match="neither an audio nor a video path"):
        extract_clip(_record(None, None), CFG, detector)
    with pytest.raises(ClipError, match="gone.mp4: file not found"):
        extract_clip(_record(tmp_path / "gone.mp4", tmp_path / "gone.mp4"), CFG, detector)
    junk = tmp_path / "junk.flv"
    junk.write_bytes(np.random.default_rng(3).bytes(30_000))
    with pytest.raises(ClipError, match="junk.flv"):
        extract_clip(_record(junk, junk), CFG, detector)
    whole = make_clip("whole.mp4", duration_s=2.0, fps=25, width=320, height=240)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.path.read_bytes()[: whole.path.stat().st_size // 2])
    with pytest.raises(ClipError, match="cut.mp4: truncated"):
        extract_clip(_record(cut, cut), CFG, detector)


def test_detector_must_match_the_config(make_clip) -> None:
    clip = make_clip("voice.m4a", duration_s=0.5, with_video=False)
    other = FaceDetector(FaceConfig(crop_size=64))
    with pytest.raises(ValueError, match="differs from the feature config"):
        extract_clip(_record(clip.path, clip.path), CFG, other)


@pytest.mark.slow
@pytest.mark.shared_data
def test_crema_d_clip(crema_flvs: list[Path], shared_data: Path) -> None:
    cfg = FeatureConfig(face=FaceConfig(detect_every=3))
    flv = crema_flvs[-1]
    wav = shared_data / "crema_d_sample" / "AudioWAV" / flv.with_suffix(".wav").name
    audio = wav if wav.exists() else flv
    f = extract_clip(_record(audio, flv, "1001_DFA"), cfg, FaceDetector(cfg.face))
    assert f.notes == []
    assert 1.5 < f.duration_s < 3.5
    assert abs(len(f.logmel) - 50 * f.duration_s) <= 3
    assert np.median(np.diff(f.video_times)) == pytest.approx(1001 / 30000, abs=1.5e-3)
    assert f.face_ratio >= 0.9


def without_video_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, any decoding of video frames (and so any face detection) fails the test."""
    import features.extract as extract

    def refuse(*args, **kwargs):
        raise AssertionError("the video was decoded although the recording's faces were handed over")

    monkeypatch.setattr(extract, "iter_video_frames", refuse)


@pytest.mark.slow
def test_streams_of_one_container_keep_its_clock(
    make_clip, detector: FaceDetector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    from dataclasses import replace

    from features.decode import probe

    clip = make_clip("sync.mp4", duration_s=1.0, fps=25, width=320, height=240, seed=3)
    wav, delayed = tmp_path / "voice.wav", tmp_path / "audio_late.mkv"
    run = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y"]
    subprocess.run([*run, "-i", str(clip.path), "-vn", "-c:a", "pcm_s16le", str(wav)], check=True)
    # PCM (no encoder priming) starting 0.2 s after the picture on the container clock.
    subprocess.run(
        [*run, "-i", str(clip.path), "-itsoffset", "0.2", "-i", str(wav), "-map", "0:v", "-map", "1:a",
         "-c:v", "copy", "-c:a", "pcm_s16le", str(delayed)],
        check=True,
    )  # fmt: skip
    info = probe(delayed)
    lag = info.audio_start_s - info.video_start_s
    assert lag == pytest.approx(0.2, abs=1e-3)
    f = extract_clip(_record(delayed, delayed), CFG, detector)
    assert f.video_times[0] == pytest.approx(max(0.0, -lag), abs=1e-6)
    assert f.audio_times[0] - f.video_times[0] == pytest.approx(0.01 + lag, abs=1e-6)
    assert f.duration_s == pytest.approx(1.0 + lag, abs=0.05)
    # Format 1 stores (built before the container clock) keep per-stream origins.
    old = extract_clip(_record(delayed, delayed), replace(CFG, format_version=1), detector)
    assert old.audio_times[0] == pytest.approx(0.01) and old.video_times[0] == 0.0
    # Separate files share no clock: nothing is shifted.
    apart = extract_clip(_record(delayed, clip.path), CFG, detector)
    assert apart.audio_times[0] == pytest.approx(0.01) and apart.video_times[0] == 0.0
    # A speed copy of a recording whose picture starts late keeps the clock, its faces detected or handed over alike.
    from features.speed import speed_copy

    late = tmp_path / "video_late.mkv"
    subprocess.run(
        [*run, "-itsoffset", "0.2", "-i", str(clip.path), "-i", str(wav), "-map", "0:v", "-map", "1:a",
         "-c:v", "copy", "-c:a", "pcm_s16le", str(late)],
        check=True,
    )  # fmt: skip
    recording = extract_clip(_record(late, late), CFG, detector)
    assert recording.video_times[0] == pytest.approx(0.2, abs=1e-3)
    copy = speed_copy(_record(late, late), 0.9)
    detected = extract_clip(copy, CFG, detector)
    without_video_decoding(monkeypatch)
    handed = extract_clip(copy, CFG, source_faces=recording)
    np.testing.assert_array_equal(handed.video_times, recording.video_times / 0.9)
    assert detected.duration_s == handed.duration_s and detected.notes == handed.notes
    for name in ("logmel", "audio_times", "face_crops", "video_times", "face_mask", "face_boxes", "face_landmarks", "face_probs"):
        np.testing.assert_array_equal(getattr(detected, name), getattr(handed, name), err_msg=name)


def _outcome(record: ClipRecord, detector: FaceDetector, combined: bool, monkeypatch: pytest.MonkeyPatch) -> dict | str:
    """Every ClipFeatures field, or the ClipError's message, with the one-process decode on or off."""
    from dataclasses import fields

    import features.extract as extract

    monkeypatch.setattr(extract, "COMBINED_DECODE", combined)
    try:
        f = extract_clip(record, CFG, detector)
    except ClipError as err:
        return str(err)
    return {field.name: getattr(f, field.name) for field in fields(f)}


@pytest.mark.slow
def test_one_process_decode_changes_nothing(make_clip, detector: FaceDetector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """extract_clip gives the same arrays (bit for bit), notes and errors with audio and video from one
    ffmpeg as from the separate decoders it used before, damaged inputs included (which fall back to those)."""
    import subprocess

    clip = make_clip("same_av.mp4", duration_s=1.0, fps="30000/1001", width=320, height=240, label="angry", seed=4)
    wav = tmp_path / "same_av.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(clip.path), "-vn", str(wav)], check=True)
    data = clip.path.read_bytes()
    cut, damaged = tmp_path / "cut_av.mp4", tmp_path / "damaged_av.mp4"
    cut.write_bytes(data[: len(data) // 2])
    at = int(len(data) * 0.6)
    damaged.write_bytes(data[:at] + np.random.default_rng(1).bytes(3000) + data[at + 3000 :])
    records = [_record(clip.path, clip.path), _record(wav, clip.path), _record(cut, cut), _record(damaged, damaged)]
    for record in records:
        got, want = _outcome(record, detector, True, monkeypatch), _outcome(record, detector, False, monkeypatch)
        if isinstance(want, str):
            assert got == want
            continue
        assert isinstance(got, dict) and got.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, np.ndarray):
                assert got[name].dtype == value.dtype, name
                np.testing.assert_array_equal(got[name], value, err_msg=name)
            else:
                assert got[name] == value, name
    assert isinstance(_outcome(records[0], detector, True, monkeypatch), dict)
    assert "cut_av.mp4: truncated" in _outcome(records[2], detector, True, monkeypatch)


@pytest.mark.slow
@pytest.mark.shared_data
def test_one_process_decode_changes_nothing_on_crema_d(
    crema_flvs: list[Path], detector: FaceDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    for flv in crema_flvs[:2]:
        record = _record(flv, flv, flv.stem)
        got, want = _outcome(record, detector, True, monkeypatch), _outcome(record, detector, False, monkeypatch)
        assert isinstance(want, dict) and isinstance(got, dict)
        for name, value in want.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got[name], value, err_msg=name)
            else:
                assert got[name] == value, name


@pytest.mark.slow
def test_a_speed_copy_runs_faster_on_both_streams(make_clip, detector: FaceDetector, monkeypatch: pytest.MonkeyPatch) -> None:
    from features.speed import speed_copy

    clip = make_clip("av_speed.mp4", duration_s=1.2, fps=25, width=320, height=240, label="sad", seed=11)
    record = _record(clip.path, clip.path)
    source = extract_clip(record, CFG, detector)
    fast = extract_clip(speed_copy(record, 1.2), CFG, detector)
    assert fast.clip_id == "c1_sp1.2"
    assert fast.logmel.shape == (50, 80)  # 1.2 s played 1.2x as fast: 1.0 s at 50 frames/s
    assert fast.duration_s == pytest.approx(source.duration_s / 1.2, abs=0.01)
    np.testing.assert_allclose(fast.video_times, source.video_times / 1.2)  # the same frames, sooner
    np.testing.assert_array_equal(fast.face_crops, source.face_crops)
    assert abs(fast.audio_times[-1] - fast.video_times[-1]) < 0.05  # the streams stay in step
    # The recording's faces handed over (what preprocessing does once the recording is stored): no decoding or
    # detection, and the same copy bit for bit.
    other = extract_clip(_record(clip.path, clip.path, clip_id="c2"), CFG, detector)
    without_video_decoding(monkeypatch)
    handed = extract_clip(speed_copy(record, 1.2), CFG, detector=None, source_faces=source)
    assert handed.duration_s == fast.duration_s and handed.notes == fast.notes
    for name in ("logmel", "audio_times", "face_crops", "video_times", "face_mask", "face_boxes", "face_landmarks", "face_probs"):
        np.testing.assert_array_equal(getattr(handed, name), getattr(fast, name), err_msg=name)
    for wrong_record, faces in ((speed_copy(record, 1.2), other), (record, source)):
        with pytest.raises(ValueError, match="only a speed copy takes faces"):
            extract_clip(wrong_record, CFG, detector, source_faces=faces)
