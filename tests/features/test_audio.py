from __future__ import annotations

import librosa
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.audio import frame_geometry, frame_times, log_mel
from features.config import AudioConfig

CFG = AudioConfig()
SR = CFG.sample_rate


@given(n=st.integers(min_value=0, max_value=2 * SR))
@settings(max_examples=20, deadline=None)
def test_frame_count_and_times(n: int) -> None:
    wave = np.zeros(n, np.float32)
    logmel, times = log_mel(wave, CFG)
    assert logmel.shape == (n // 320, CFG.n_mels) and logmel.dtype == np.float32
    assert times.dtype == np.float64
    # 50 frames per second; frame t describes [0.02 t, 0.02 (t + 1)).
    np.testing.assert_allclose(times, 0.02 * np.arange(n // 320) + 0.01, atol=1e-12)
    assert np.isfinite(logmel).all()


def test_fifty_frames_per_second_for_a_two_second_clip() -> None:
    logmel, times = log_mel(np.random.default_rng(0).standard_normal(2 * SR).astype(np.float32), CFG)
    assert logmel.shape == (100, 80)
    assert times[0] == pytest.approx(0.01) and times[-1] == pytest.approx(1.99)


def test_times_locate_a_burst() -> None:
    """A 10 ms tone burst at 0.73 s peaks in the frame whose centre is nearest to it."""
    wave = np.zeros(SR, np.float32)
    t0 = 0.73
    start = int(t0 * SR) - 80
    wave[start : start + 160] = np.sin(2 * np.pi * 1000 * np.arange(160) / SR)
    logmel, times = log_mel(wave, CFG)
    energy = logmel.max(axis=1)
    assert abs(times[energy.argmax()] - t0) <= 0.01 + 1e-9


def test_tone_lands_in_the_right_mel_band() -> None:
    t = np.arange(SR) / SR
    logmel, _ = log_mel((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), CFG)
    centres = librosa.mel_frequencies(CFG.n_mels + 2, fmin=CFG.fmin, fmax=CFG.fmax)[1:-1]
    peak = centres[int(np.median(logmel.argmax(axis=1)))]
    assert peak == pytest.approx(1000, rel=0.08)


def test_silence_is_the_log_floor() -> None:
    logmel, _ = log_mel(np.zeros(SR, np.float32), CFG)
    np.testing.assert_allclose(logmel, np.log(CFG.log_floor), rtol=1e-6)


def test_short_and_bad_inputs() -> None:
    logmel, times = log_mel(np.zeros(319, np.float32), CFG)
    assert logmel.shape == (0, 80) and times.shape == (0,)
    with pytest.raises(ValueError, match=r"mono \(N,\) wave, got shape \(2, 100\)"):
        log_mel(np.zeros((2, 100), np.float32), CFG)
    with pytest.raises(ValueError, match="does not fit n_fft=256"):
        frame_geometry(AudioConfig(n_fft=256))
    with pytest.raises(ValueError, match="whole number of samples"):
        frame_geometry(AudioConfig(hop_length_s=0.01001))


def test_other_geometry_keeps_the_formula() -> None:
    cfg = AudioConfig(sample_rate=8_000, hop_length_s=0.01, win_length_s=0.03, n_fft=256, fmax=3_800.0)
    hop, win, pad = frame_geometry(cfg)
    assert (hop, win, pad) == (80, 240, 88)
    logmel, times = log_mel(np.ones(800, np.float32), cfg)
    assert logmel.shape == (10, 80)
    np.testing.assert_allclose(times, frame_times(10, cfg))
    np.testing.assert_allclose(times, (np.arange(10) * 80 - 88 + 128) / 8_000)
