from __future__ import annotations

import wave as wavfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from features.clip import ClipError
from features.decode import decode_audio, decode_audio_video, iter_video_frames, output_size, probe
from features.synthetic import SpeakerStyle

RATES = [25, 30, "30000/1001"]


def _all_frames(path: Path, **kwargs: object) -> tuple[np.ndarray, np.ndarray, list[int]]:
    frames, times, sizes = [], [], []
    for f, t in iter_video_frames(path, **kwargs):  # type: ignore[arg-type]
        assert f.dtype == np.uint8 and f.ndim == 4 and f.shape[-1] == 3
        assert t.dtype == np.float64 and t.shape == (len(f),)
        frames.append(f)
        times.append(t)
        sizes.append(len(f))
    return np.concatenate(frames), np.concatenate(times), sizes


@pytest.mark.parametrize("fps", RATES)
def test_probe_and_frame_times_are_exact(make_clip, fps: object) -> None:
    clip = make_clip(f"rate_{str(fps).replace('/', '_')}.mp4", duration_s=1.0, fps=fps, width=320, height=240)
    info = probe(clip.path)
    rate = float(Fraction(str(fps)))
    assert info.has_video and info.has_audio
    assert (info.width, info.height) == (320, 240)
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert info.fps == pytest.approx(rate, rel=1e-6)
    assert info.duration_s == pytest.approx(1.0, abs=0.05)

    frames, times, sizes = _all_frames(clip.path, chunk=7, info=info)
    assert len(frames) == clip.n_frames == round(rate * 1.0)
    assert max(sizes) <= 7 and sum(sizes) == len(frames)
    np.testing.assert_allclose(times, np.arange(len(times)) / rate, atol=1e-3)
    assert times[0] == 0.0


def test_frames_are_rgb_in_the_drawn_layout(make_clip) -> None:
    speaker = SpeakerStyle(background=(200, 40, 30), face_height=0.5, position=(0.5, 0.5))
    clip = make_clip("rgb.mp4", duration_s=0.4, fps=25, width=320, height=240, speaker=speaker)
    frames, _, _ = _all_frames(clip.path)
    # Top-left corner is pure background: the synthetic gradient starts at 0.85 of the colour.
    corner = frames[:, 2:10, 2:10].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(corner, np.array([200, 40, 30]) * 0.85, atol=8)
    # The face is where the generator put it: its centre pixel differs from the background.
    cx, cy = clip.face_centers[0].astype(int)
    assert np.abs(frames[0, cy, cx].astype(int) - corner).sum() > 60


def test_max_side_shrinks_in_ffmpeg(make_clip) -> None:
    clip = make_clip("rate_25.mp4", duration_s=1.0, fps=25, width=320, height=240)
    frames, times, _ = _all_frames(clip.path, max_side=160)
    assert frames.shape[1:] == (120, 160, 3)
    assert len(times) == clip.n_frames
    assert output_size(320, 240, 160) == (160, 120)
    assert output_size(320, 240, 640) == (320, 240)  # never enlarged


def test_stopping_early_kills_ffmpeg(make_clip) -> None:
    clip = make_clip("rate_25.mp4", duration_s=1.0, fps=25, width=320, height=240)
    gen = iter_video_frames(clip.path, chunk=4)
    first, _ = next(gen)
    gen.close()  # must not hang or leak the process
    assert len(first) == 4


def test_decode_audio_trims_codec_padding(make_clip) -> None:
    clip = make_clip("rate_25.mp4", duration_s=1.0, fps=25, width=320, height=240)
    audio = decode_audio(clip.path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 16_000  # AAC pads its last frame; the stream duration cuts it
    assert 0.05 < np.abs(audio).max() <= 1.0


def test_decode_audio_pcm_is_sample_exact_and_resamples(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(8_000) / 8_000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)
    pcm = np.round(tone * 32767).astype("<i2")
    path = tmp_path / "tone8k.wav"
    with wavfile.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8_000)
        w.writeframes(pcm.tobytes())
    same = decode_audio(path, sample_rate=8_000)
    np.testing.assert_allclose(same, pcm / 32768.0, atol=1e-6)
    up = decode_audio(path, sample_rate=16_000)
    assert len(up) == 16_000
    spectrum = np.abs(np.fft.rfft(up))
    assert np.fft.rfftfreq(len(up), 1 / 16_000)[spectrum.argmax()] == pytest.approx(440, abs=2)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(ClipError, match="nope.mp4: file not found"):
        probe(missing)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for fn in (probe, decode_audio, lambda p: list(iter_video_frames(p))):
        with pytest.raises(ClipError, match="empty.mp4: zero-length file"):
            fn(empty)


def test_random_bytes_are_unreadable(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(1).bytes(40_000))
    with pytest.raises(ClipError, match="junk.mp4: ffprobe cannot read it: .*Invalid data"):
        probe(junk)


@pytest.mark.parametrize("suffix,codec", [(".mp4", "aac"), (".mkv", "pcm_s16le")])
def test_truncated_files_are_refused(make_clip, tmp_path: Path, suffix: str, codec: str) -> None:
    clip = make_clip(f"whole{suffix}", duration_s=2.0, fps=25, width=320, height=240, audio_codec=codec)
    data = clip.path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ClipError, match="truncated or corrupt video"):
        list(iter_video_frames(cut))
    with pytest.raises(ClipError, match="truncated or corrupt audio"):
        decode_audio(cut)


def test_missing_streams(make_clip) -> None:
    audio_only = make_clip("audio_only.m4a", duration_s=0.5, with_video=False)
    info = probe(audio_only.path)
    assert info.has_audio and not info.has_video
    with pytest.raises(ClipError, match="audio_only.m4a: no video stream"):
        list(iter_video_frames(audio_only.path))
    silent = make_clip("silent.mp4", duration_s=0.5, fps=25, with_audio=False)
    assert not probe(silent.path).has_audio
    with pytest.raises(ClipError, match="silent.mp4: no audio stream"):
        decode_audio(silent.path)


@pytest.mark.shared_data
def test_crema_d_flv(crema_flvs: list[Path]) -> None:
    for path in crema_flvs[:3]:
        info = probe(path)
        assert info.video_codec == "vp6f" and info.audio_codec == "mp3"
        assert info.fps == pytest.approx(29.97, abs=0.01)
        assert 1.5 < info.duration_s < 3.5
        frames, times, _ = _all_frames(path, info=info)
        assert frames.shape[1:] == (360, 480, 3)
        # FLV stores whole milliseconds (truncated by the muxer), and times are relative to the
        # first frame's quantised pts: two 1 ms quantisations, so within 2 ms of k / 29.97.
        np.testing.assert_allclose(times, np.arange(len(times)) * 1001 / 30000, atol=2e-3)
        assert np.all(np.diff(times) > 0.032) and np.all(np.diff(times) < 0.035)
        assert times[-1] + 1001 / 30000 == pytest.approx(info.duration_s, abs=0.1)
        audio = decode_audio(path, info=info)
        assert len(audio) / 16_000 == pytest.approx(info.duration_s, abs=0.1)


def test_chunks_are_bounded_in_bytes(make_clip, monkeypatch: pytest.MonkeyPatch) -> None:
    import features.decode as decode

    clip = make_clip("rate_25.mp4", duration_s=1.0, fps=25, width=320, height=240)
    whole = [(f.copy(), t) for f, t in iter_video_frames(clip.path, chunk=32)]
    monkeypatch.setattr(decode, "MAX_CHUNK_BYTES", 5 * 320 * 240 * 3 + 1)  # room for 5 frames
    small = list(iter_video_frames(clip.path, chunk=32))
    assert max(len(f) for f, _ in small) == 5
    np.testing.assert_array_equal(np.concatenate([f for f, _ in small]), np.concatenate([f for f, _ in whole]))
    np.testing.assert_array_equal(np.concatenate([t for _, t in small]), np.concatenate([t for _, t in whole]))


def _collect(chunks) -> tuple[np.ndarray, np.ndarray]:
    frames, times = zip(*[(f.copy(), t) for f, t in chunks], strict=True)
    return np.concatenate(frames), np.concatenate(times)


def _same_as_separate(audio: Path, video: Path) -> None:
    a_info, v_info = probe(audio), probe(video)
    wave, (frames, times) = decode_audio_video(a_info, v_info, _collect)
    np.testing.assert_array_equal(wave, decode_audio(audio, info=a_info))
    assert wave.dtype == np.float32 and wave.flags.writeable
    want_frames, want_times = _collect(iter_video_frames(video, info=v_info))
    np.testing.assert_array_equal(frames, want_frames)
    np.testing.assert_array_equal(times, want_times)


@pytest.mark.parametrize("fps", RATES)
def test_one_process_decodes_what_the_separate_decoders_do(make_clip, fps: object) -> None:
    clip = make_clip(f"rate_{str(fps).replace('/', '_')}.mp4", duration_s=1.0, fps=fps, width=320, height=240)
    _same_as_separate(clip.path, clip.path)


def test_one_process_decodes_two_files(make_clip, tmp_path: Path) -> None:
    import subprocess

    clip = make_clip("rate_25.mp4", duration_s=1.0, fps=25, width=320, height=240)
    wav = tmp_path / "voice.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(clip.path), "-vn", "-ar", "22050", str(wav)], check=True)
    _same_as_separate(wav, clip.path)


def test_one_process_decode_is_strict(make_clip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    clip = make_clip("rate_25.mp4", duration_s=1.0, fps=25, width=320, height=240)
    info = probe(clip.path)
    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    # A consumer that stops early: refused (the audio may be incomplete), and ffmpeg is not left running.
    monkeypatch.setattr(subprocess, "Popen", Recorded)
    with pytest.raises(ClipError, match="stopped before the last frame"):
        decode_audio_video(info, info, lambda chunks: next(iter(chunks)), chunk=4)
    assert len(started) == 1 and started[0].returncode is not None

    def fails_at_once(chunks: object) -> None:
        raise RuntimeError("consumer broke")

    with pytest.raises(RuntimeError, match="consumer broke"):  # not a ClipError: it is not about the file
        decode_audio_video(info, info, fails_at_once)
    assert len(started) == 2 and started[1].returncode is not None
    monkeypatch.undo()
    # Damaged packets the separate video decoder lets through (ffmpeg exits 0) are refused here:
    # its decode-error rate counts both streams, so only the separate decoders can judge the audio.
    data = bytearray(clip.path.read_bytes())
    at = len(data) // 2
    data[at : at + 3000] = np.random.default_rng(1).bytes(3000)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ClipError, match=r"damaged.mp4: ffmpeg reported \d+ error\(s\)"):
        decode_audio_video(probe(damaged), probe(damaged), _collect)
    silent = make_clip("silent.mp4", duration_s=0.5, fps=25, with_audio=False)
    with pytest.raises(ClipError, match="silent.mp4: no audio stream"):
        decode_audio_video(probe(silent.path), probe(silent.path), _collect)
    audio_only = make_clip("audio_only.m4a", duration_s=0.5, with_video=False)
    with pytest.raises(ClipError, match="audio_only.m4a: no video stream"):
        decode_audio_video(probe(audio_only.path), probe(audio_only.path), _collect)


@pytest.mark.shared_data
def test_one_process_decode_of_crema_d(crema_flvs: list[Path]) -> None:
    for path in crema_flvs:
        _same_as_separate(path, path)
