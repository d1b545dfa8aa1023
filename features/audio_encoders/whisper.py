"""Whisper's audio encoder as a plain torch module, and Whisper's log-mel input (pure functions).

Why msata's own port rather than ``transformers``: the packaged weights are CTranslate2
files (fp16 raw tensors), the encoder is ~60 lines, and owning it keeps the install small and
lets it run on unpadded clips (Whisper itself pads every input to 30 s). It is checked
against CTranslate2's own run of the same weights (tests/features/test_whisper.py).

    wave (N,) 16 kHz --whisper_log_mel--> (80, M) with M = N // 160 (10 ms hop)
    --conv1 (k3) GELU--conv2 (k3, stride 2) GELU--> (T, D), T = ceil(M / 2): 50 frames per second
    + sinusoidal positions[:T] --N pre-norm blocks--> final LayerNorm

Hidden states follow the Hugging Face / SUPERB convention: ``n_layers + 1`` of them, the
input embedding first and the last block's output after the final LayerNorm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160  # 10 ms mel hop
N_MELS = 80
MAX_FRAMES = 1500  # positions in the encoder: 30 s at 50 frames per second
SAMPLES_PER_FRAME = 2 * HOP  # one encoder frame = 20 ms = 320 samples


def whisper_log_mel(wave: torch.Tensor) -> torch.Tensor:
    """Whisper's log-mel of a mono 16 kHz wave: (N,) float -> (80, N // 160) float32.

    Same as ``whisper.audio.log_mel_spectrogram``: centred STFT (reflect padding), the last
    frame dropped, Slaney mel filters, log10 clamped at 1e-10, floored at max - 8, (x + 4) / 4.
    """
    if wave.ndim != 1:
        raise ValueError(f"whisper_log_mel expects a mono (N,) wave, got shape {tuple(wave.shape)}")
    if wave.shape[0] < SAMPLES_PER_FRAME:
        raise ValueError(f"a wave of {wave.shape[0]} samples is shorter than one encoder frame ({SAMPLES_PER_FRAME} samples)")
    window = torch.hann_window(N_FFT, device=wave.device)
    stft = torch.stft(wave.to(torch.float32), N_FFT, HOP, window=window, return_complex=True)  # (201, M + 1)
    power = stft[:, :-1].abs() ** 2  # (201, M)
    filters = torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS)).to(wave.device)  # (80, 201)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@dataclass(frozen=True)
class WhisperEncoderShape:
    n_mels: int
    width: int
    n_heads: int
    n_layers: int


class WhisperBlock(nn.Module):
    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)  # fused q, k, v as CTranslate2 stores them (k bias is 0)
        self.out = nn.Linear(width, width)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn_in = nn.Linear(width, 4 * width)
        self.ffn_out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); key_mask (B, T) bool, True = a real frame. Without a mask every frame is
        attended to (Whisper's own encoder); with one, padded frames are never looked at, so a
        padded batch gives each clip the states it gets alone (fine-tuning on stored states)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, shape: WhisperEncoderShape) -> None:
        super().__init__()
        self.shape = shape
        self.conv1 = nn.Conv1d(shape.n_mels, shape.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(shape.width, shape.width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(MAX_FRAMES, shape.width))
        self.blocks = nn.ModuleList(WhisperBlock(shape.width, shape.n_heads) for _ in range(shape.n_layers))
        self.final_norm = nn.LayerNorm(shape.width)

    def forward(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """mel (B, 80, M) -> n_layers + 1 hidden states, each (B, ceil(M / 2), D)."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # (B, T, D)
        if x.shape[1] > MAX_FRAMES:
            raise ValueError(f"{x.shape[1]} encoder frames exceed Whisper's {MAX_FRAMES} positions (30 s): encode in windows")
        x = x + self.positions[: x.shape[1]]
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        states[-1] = self.final_norm(x)
        return states

    @classmethod
    def from_ct2(cls, tensors: dict[str, np.ndarray]) -> WhisperEncoder:
        """Build from the ``encoder/...`` tensors of a CTranslate2 Whisper model (fp16 -> float32)."""
        n_layers = len({name.split("/")[1] for name in tensors if re.match(r"encoder/layer_\d+/", name)})
        conv1 = tensors["encoder/conv1/weight"]  # (D, n_mels, 3)
        shape = WhisperEncoderShape(
            n_mels=conv1.shape[1], width=conv1.shape[0], n_heads=int(tensors["encoder/num_heads"]), n_layers=n_layers
        )
        model = cls(shape)
        names = {
            "conv1.weight": "conv1/weight", "conv1.bias": "conv1/bias",
            "conv2.weight": "conv2/weight", "conv2.bias": "conv2/bias",
            "positions": "position_encodings/encodings",
            "final_norm.weight": "layer_norm/gamma", "final_norm.bias": "layer_norm/beta",
        }  # fmt: skip
        for i in range(n_layers):
            ct2 = f"layer_{i}"
            names.update({
                f"blocks.{i}.attn_norm.weight": f"{ct2}/self_attention/layer_norm/gamma",
                f"blocks.{i}.attn_norm.bias": f"{ct2}/self_attention/layer_norm/beta",
                f"blocks.{i}.qkv.weight": f"{ct2}/self_attention/linear_0/weight",
                f"blocks.{i}.qkv.bias": f"{ct2}/self_attention/linear_0/bias",
                f"blocks.{i}.out.weight": f"{ct2}/self_attention/linear_1/weight",
                f"blocks.{i}.out.bias": f"{ct2}/self_attention/linear_1/bias",
                f"blocks.{i}.ffn_norm.weight": f"{ct2}/ffn/layer_norm/gamma",
                f"blocks.{i}.ffn_norm.bias": f"{ct2}/ffn/layer_norm/beta",
                f"blocks.{i}.ffn_in.weight": f"{ct2}/ffn/linear_0/weight",
                f"blocks.{i}.ffn_in.bias": f"{ct2}/ffn/linear_0/bias",
                f"blocks.{i}.ffn_out.weight": f"{ct2}/ffn/linear_1/weight",
                f"blocks.{i}.ffn_out.bias": f"{ct2}/ffn/linear_1/bias",
            })  # fmt: skip
        state = {ours: torch.from_numpy(tensors[f"encoder/{theirs}"].astype(np.float32)) for ours, theirs in names.items()}
        model.load_state_dict(state, strict=True)
        return model.eval()


def frame_times(n_frames: int) -> np.ndarray:
    """Centre time of each encoder frame, seconds: frame j sits on mel frame 2j, at 0.02 j s. (T,) float64"""
    return np.arange(n_frames, dtype=np.float64) * (SAMPLES_PER_FRAME / SAMPLE_RATE)
