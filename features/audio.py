"""Log-mel features with exact frame times (pure functions, no I/O)."""

from __future__ import annotations

import librosa
import numpy as np

from features.config import AudioConfig


def frame_geometry(config: AudioConfig) -> tuple[int, int, int]:
    """(hop, win, pad_left) in samples; raises ValueError for inconsistent settings."""
    hop = round(config.hop_length_s * config.sample_rate)
    win = round(config.win_length_s * config.sample_rate)
    if hop < 1 or win < 1:
        raise ValueError(f"hop ({hop}) and window ({win}) must be at least one sample: {config}")
    if abs(hop - config.hop_length_s * config.sample_rate) > 1e-6:
        raise ValueError(f"hop_length_s={config.hop_length_s} is not a whole number of samples at {config.sample_rate} Hz")
    if win > config.n_fft:
        raise ValueError(f"window of {win} samples does not fit n_fft={config.n_fft}")
    if config.n_fft < hop:
        raise ValueError(f"n_fft={config.n_fft} is shorter than the hop of {hop} samples")
    return hop, win, (config.n_fft - hop) // 2


def frame_times(n_frames: int, config: AudioConfig) -> np.ndarray:
    """Centre time in seconds of each log-mel frame: (T,) float64; see :func:`log_mel`."""
    hop, _, pad_left = frame_geometry(config)
    t = np.arange(n_frames, dtype=np.float64)
    return (t * hop - pad_left + config.n_fft / 2) / config.sample_rate


def log_mel(wave: np.ndarray, config: AudioConfig) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel spectrogram of a mono wave at ``config.sample_rate``.

    Returns ``(logmel, times)``: logmel (T, n_mels) float32 = log(mel power + log_floor),
    times (T,) float64 seconds.

    Framing (no librosa centring, so times are exact): with hop ``h`` and ``n_fft``
    samples, the wave is zero-padded by ``p = (n_fft - h) // 2`` samples in front and
    frame t spans padded samples ``[t*h, t*h + n_fft)``; the ``win_length`` Hann
    window sits in the middle of that span. Hence

        T = floor(N / h)                       (N = number of samples)
        time[t] = (t*h - p + n_fft/2) / sample_rate

    which for the defaults (h = 320, n_fft = 512, 16 kHz) is ``time[t] = 0.02*t + 0.01``:
    frame t describes the 20 ms segment ``[0.02 t, 0.02 (t+1))`` with a 25 ms window
    centred on it. A wave shorter than one hop gives T = 0.
    """
    if wave.ndim != 1:
        raise ValueError(f"log_mel expects a mono (N,) wave, got shape {wave.shape}")
    hop, win, pad_left = frame_geometry(config)
    n_frames = wave.shape[0] // hop
    if n_frames == 0:
        return np.zeros((0, config.n_mels), dtype=np.float32), np.zeros(0, dtype=np.float64)
    # Enough zeros at the end that the last frame's n_fft span exists.
    needed = (n_frames - 1) * hop + config.n_fft
    pad_right = max(0, needed - pad_left - wave.shape[0])
    padded = np.pad(wave.astype(np.float32, copy=False), (pad_left, pad_right))  # (>= needed,)
    mel = librosa.feature.melspectrogram(
        y=padded[:needed],
        sr=config.sample_rate,
        n_fft=config.n_fft,
        hop_length=hop,
        win_length=win,
        window="hann",
        center=False,
        power=2.0,
        n_mels=config.n_mels,
        fmin=config.fmin,
        fmax=config.fmax,
    )  # (n_mels, T)
    if mel.shape[1] != n_frames:
        raise RuntimeError(f"framing produced {mel.shape[1]} frames, expected {n_frames}")
    logmel = np.log(mel.T + config.log_floor).astype(np.float32)  # (T, n_mels)
    return logmel, frame_times(n_frames, config)
