"""Wave in, timestamped hidden states of a pretrained encoder out: the audio feature stage.

Long files are encoded in windows of at most ``window_s`` (Whisper has 30 s of positions),
so memory per step does not grow with the file; frame times carry each window's offset.
The encoder is loaded once per process and device (weights sha256-checked on load).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from features.audio_encoders.registry import packaged_encoder
from features.audio_encoders.weights import load_encoder_tensors
from features.audio_encoders.whisper import MAX_FRAMES, SAMPLE_RATE, SAMPLES_PER_FRAME, WhisperEncoder, frame_times, whisper_log_mel
from features.config import AudioEncoderConfig


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=4)
def load_packaged_encoder(name: str, device: str = "cpu") -> WhisperEncoder:
    """The packaged encoder ``name`` on ``device``, eval mode, weights checked; cached per process."""
    return WhisperEncoder.from_ct2(load_encoder_tensors(packaged_encoder(name))).to(device)


def window_samples(config: AudioEncoderConfig) -> int:
    frames = min(MAX_FRAMES, int(round(config.window_s * SAMPLE_RATE / SAMPLES_PER_FRAME)))
    return frames * SAMPLES_PER_FRAME


def encode_wave(wave: np.ndarray, config: AudioEncoderConfig, device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states of ``config``'s encoder for a mono 16 kHz wave.

    Returns ``(states, times)``: states (T, L, D) float16 with L = len(config.state_indices()),
    times (T,) float64 centre of each 20 ms frame from the wave's first sample. A wave shorter
    than one frame (320 samples) gives T = 0; a trailing piece under one frame is dropped.
    """
    if wave.ndim != 1:
        raise ValueError(f"encode_wave expects a mono (N,) wave, got shape {wave.shape}")
    encoder_spec = packaged_encoder(config.name)
    device = torch.device(device) if device is not None else default_device()
    model = load_packaged_encoder(config.name, str(device))
    layers = list(config.state_indices())
    step = window_samples(config)
    pieces: list[np.ndarray] = []
    for start in range(0, wave.shape[0], step):
        piece = wave[start : start + step]
        if piece.shape[0] < SAMPLES_PER_FRAME:
            break
        with torch.inference_mode():
            mel = whisper_log_mel(torch.from_numpy(np.ascontiguousarray(piece, dtype=np.float32)).to(device))  # (80, M)
            states = model(mel[None])  # L_all x (1, T_w, D)
            chosen = torch.stack([states[i][0] for i in layers], dim=1)  # (T_w, L, D)
        pieces.append(chosen.to(torch.float16).cpu().numpy())
    if not pieces:
        return np.zeros((0, len(layers), encoder_spec.width), np.float16), np.zeros(0, np.float64)
    states_all = np.concatenate(pieces)  # (T, L, D)
    return states_all, frame_times(states_all.shape[0])
