"""Wave in, timestamped hidden states of a pretrained encoder out: the audio feature stage.

Two kinds of encoder: the packaged Whisper models (msata's own port, sha256-checked CTranslate2
weights) and local Hugging Face checkpoints (``hf:/dir``, ``hf_checkpoint.py``): Whisper ones run
on the same port, wav2vec2 / HuBERT / WavLM through ``transformers``.

Long files are encoded in windows of at most ``window_s`` (Whisper has 30 s of positions),
so memory per step does not grow with the file; frame times carry each window's offset.
The encoder is loaded once per process and device (weights sha256-checked on load).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from features.audio_encoders import hf_checkpoint
from features.audio_encoders.registry import HF_PREFIX, packaged_encoder
from features.audio_encoders.weights import load_encoder_tensors, weight_files
from features.audio_encoders.whisper import MAX_FRAMES, SAMPLE_RATE, SAMPLES_PER_FRAME, WhisperEncoder, frame_times, whisper_log_mel
from features.config import AudioEncoderConfig
from features.spill import FrameSpool


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=4)
def load_packaged_encoder(name: str, device: str = "cpu") -> WhisperEncoder:
    """The packaged encoder ``name`` on ``device``, eval mode, weights checked; cached per process."""
    return WhisperEncoder.from_ct2(load_encoder_tensors(packaged_encoder(name))).to(device)


@lru_cache(maxsize=2)
def load_checkpoint_encoder(directory: str, sha256: str, device: str = "cpu") -> Any:
    """A checkpoint's encoder on ``device``: msata's Whisper port for Whisper, else the transformers
    model; cached per (directory, sha256, device), the file re-checked by every ``encode_wave``."""
    model = hf_checkpoint.load_model(directory, sha256, "cpu")
    if model.config.model_type == "whisper":
        model = hf_checkpoint.whisper_port(model)
    return model.to(device)


def check_encoder_weights(config: AudioEncoderConfig) -> None:
    """Raise a one-line WeightsError when ``config``'s encoder cannot run here: a packaged one not
    installed, a checkpoint missing or no longer the file whose sha256 the config records."""
    if config.is_log_mel:
        return
    if config.is_hf_checkpoint:
        hf_checkpoint.verified_weights(_directory(config), config.weights_sha256)
    else:
        weight_files(packaged_encoder(config.name))


def _directory(config: AudioEncoderConfig) -> str:
    return config.name[len(HF_PREFIX) :]


def window_samples(config: AudioEncoderConfig) -> int:
    frames = min(MAX_FRAMES, int(round(config.window_s * SAMPLE_RATE / SAMPLES_PER_FRAME)))
    return frames * SAMPLES_PER_FRAME


def encode_wave(
    wave: np.ndarray, config: AudioEncoderConfig, device: torch.device | str | None = None, spill_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states of ``config``'s encoder for a mono 16 kHz wave.

    Returns ``(states, times)``: states (T, L, D) float16 with (L, D) = config.state_shape(),
    times (T,) float64 centre of each frame from the wave's first sample. Whisper: 20 ms frames
    at 0.02 j s; a wave shorter than one frame (320 samples) gives T = 0 and a trailing piece
    under one frame is dropped. wav2vec2 family: see ``hf_checkpoint.encode_wav2vec2_family``.
    Whisper states past features.spill.SPILL_BYTES (~3 minutes of whisper-base's 7 x 512) go to a
    nameless file in ``spill_dir`` and come back as a read-only memmap (10 minutes: 215 MB).
    """
    if wave.ndim != 1:
        raise ValueError(f"encode_wave expects a mono (N,) wave, got shape {wave.shape}")
    if config.is_log_mel:
        raise ValueError("encode_wave needs a pretrained audio encoder, the config says log-mel")
    device = torch.device(device) if device is not None else default_device()
    layers = list(config.state_indices())
    if config.is_hf_checkpoint:
        directory = _directory(config)
        hf_checkpoint.verified_weights(directory, config.weights_sha256)  # cheap (cached by mtime); catches a file changed mid-run
        model = load_checkpoint_encoder(directory, config.weights_sha256, str(device))
        if config.model_type in hf_checkpoint.WAV2VEC2_FAMILY:
            return hf_checkpoint.encode_wav2vec2_family(
                model, wave, hf_checkpoint.conv_geometry(directory), layers, int(round(config.window_s * SAMPLE_RATE)),
                hf_checkpoint.normalises_wave(directory), device,
            )  # fmt: skip
    else:
        model = load_packaged_encoder(config.name, str(device))
    return encode_whisper(model, wave, config, layers, device, spill_dir)


def encode_whisper(
    model: WhisperEncoder,
    wave: np.ndarray,
    config: AudioEncoderConfig,
    layers: list[int],
    device: torch.device,
    spill_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``encode_wave`` for a Whisper encoder already loaded (windows, float16 states, frame times)."""
    step = window_samples(config)
    pieces = FrameSpool(config.state_shape(), np.float16, directory=spill_dir)  # (T, L, D) in windows; bounded in memory
    try:
        for start in range(0, wave.shape[0], step):
            piece = wave[start : start + step]
            if piece.shape[0] < SAMPLES_PER_FRAME:
                break
            with torch.inference_mode():
                mel = whisper_log_mel(torch.from_numpy(np.ascontiguousarray(piece, dtype=np.float32)).to(device))  # (80, M)
                states = model(mel[None])  # L_all x (1, T_w, D)
                chosen = torch.stack([states[i][0] for i in layers], dim=1)  # (T_w, L, D)
            pieces.append(chosen.to(torch.float16).cpu().numpy())
    except BaseException:
        pieces.close()  # a spilled file goes now, not when the traceback does
        raise
    states_all = pieces.array()  # (T, L, D); (0, L, D) when the wave is under one frame
    return states_all, frame_times(states_all.shape[0])
