"""TaRoPE: rotary position embeddings driven by real timestamps.

Standard RoPE rotates feature pair i of a token at integer position p by the
angle p * base^(-2i/d). TaRoPE replaces p by ``rate * t`` where t is the
token's timestamp in seconds, so an audio token and a video token taken at the
same instant get exactly the same rotation, and q.k after rotation depends only
on t_q - t_k whatever the frame rates. With ``rate = 50`` an audio frame k at
t = k/50 keeps position k, i.e. TaRoPE reduces to plain RoPE on the audio stream.

The maths are pure functions with positions passed explicitly (float32 inside,
cast back to the input dtype). Three interchangeable modules with one interface
are injected into attention, which never knows which one it holds:

    rotation = module.precompute(times, index_positions)  # once per forward
    q, k = module(q, k, rotation)                           # in every layer

Pairing convention: feature i is paired with feature i + d/2 ("rotate half",
as in GPT-NeoX / rotary-embedding-torch); the angle of pair i is the i-th
frequency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_RATE = 50.0  # position ids per second: one per 20 ms audio frame
DEFAULT_BASE = 10_000.0


def inverse_frequencies(dim: int, base: float = DEFAULT_BASE) -> torch.Tensor:
    """base^(-2i/dim) for i in [0, dim/2) as float32, shape (dim/2,)."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even number, got {dim}")
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rotary_angles(times: torch.Tensor, dim: int, rate: float = DEFAULT_RATE, base: float = DEFAULT_BASE) -> torch.Tensor:
    """Angles t * rate * base^(-2i/dim): times (..., T) seconds -> (..., T, dim/2) float32."""
    inv_freq = inverse_frequencies(dim, base).to(times.device)
    return (times.to(torch.float32) * rate).unsqueeze(-1) * inv_freq


@dataclass
class Rotation:
    """cos/sin of the rotary angles, ready to broadcast against (B, H, T, Dh)."""

    cos: torch.Tensor  # (B, 1, T, Dh/2) float32
    sin: torch.Tensor  # (B, 1, T, Dh/2) float32


def rotation_from_angles(angles: torch.Tensor) -> Rotation:
    """angles (B, T, Dh/2) -> Rotation with a head axis inserted."""
    angles = angles.unsqueeze(1)  # (B, 1, T, Dh/2)
    return Rotation(cos=angles.cos(), sin=angles.sin())


def rotate(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+Dh/2}) of x (B, H, T, Dh) by the given angles.

    Computed in float32 (bf16 angles lose the phase of high positions) and cast
    back to x's dtype.
    """
    half = x.shape[-1] // 2
    xf = x.to(torch.float32)
    x1, x2 = xf[..., :half], xf[..., half:]  # (B, H, T, Dh/2) each
    cos, sin = rotation.cos, rotation.sin
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def apply_rotary(x: torch.Tensor, times: torch.Tensor, rate: float = DEFAULT_RATE, base: float = DEFAULT_BASE) -> torch.Tensor:
    """Time-aligned rotary embedding of x (B, H, T, Dh) at times (B, T) seconds.

    Times may be any floats: variable frame rates, offsets, gaps of missing frames.
    """
    if x.shape[-2] != times.shape[-1] or x.shape[0] != times.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and times {tuple(times.shape)} disagree on (B, T)")
    return rotate(x, rotation_from_angles(rotary_angles(times, x.shape[-1], rate, base)))


class TimeRotary(nn.Module):
    """TaRoPE: the rotation of each token comes from its timestamp (seconds)."""

    def __init__(self, head_dim: int, rate: float = DEFAULT_RATE, base: float = DEFAULT_BASE) -> None:
        super().__init__()
        self.rate = rate
        # Not persistent: derived from head_dim/base, so checkpoints stay config-only.
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, base), persistent=False)

    def precompute(self, times: torch.Tensor, index_positions: torch.Tensor) -> Rotation | None:
        # times (B, T) seconds; index positions are ignored on purpose.
        angles = (times.to(torch.float32) * self.rate).unsqueeze(-1) * self.inv_freq  # (B, T, Dh/2)
        return rotation_from_angles(angles)

    def forward(self, q: torch.Tensor, k: torch.Tensor, rotation: Rotation | None) -> tuple[torch.Tensor, torch.Tensor]:
        if rotation is None:
            raise ValueError("TimeRotary needs the Rotation returned by precompute()")
        return rotate(q, rotation), rotate(k, rotation)


class IndexRotary(nn.Module):
    """Standard RoPE on per-modality token indices (audio 0..Ta-1, video 0..Tv-1).

    The ablation: both streams start at position 0 and advance one position per
    token, so at 50 vs 30 tokens/s they drift apart in time.
    """

    def __init__(self, head_dim: int, base: float = DEFAULT_BASE) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, base), persistent=False)

    def precompute(self, times: torch.Tensor, index_positions: torch.Tensor) -> Rotation | None:
        angles = index_positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (B, T, Dh/2)
        return rotation_from_angles(angles)

    def forward(self, q: torch.Tensor, k: torch.Tensor, rotation: Rotation | None) -> tuple[torch.Tensor, torch.Tensor]:
        if rotation is None:
            raise ValueError("IndexRotary needs the Rotation returned by precompute()")
        return rotate(q, rotation), rotate(k, rotation)


class NoRotary(nn.Module):
    """No positional information at all: attention sees a bag of tokens."""

    def precompute(self, times: torch.Tensor, index_positions: torch.Tensor) -> Rotation | None:
        return None

    def forward(self, q: torch.Tensor, k: torch.Tensor, rotation: Rotation | None) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


POSITION_KINDS = ("tarope", "index", "none")


def build_rotary(kind: str, head_dim: int, rate: float = DEFAULT_RATE, base: float = DEFAULT_BASE) -> nn.Module:
    """The position module for MsataConfig.positions."""
    if kind == "tarope":
        return TimeRotary(head_dim, rate=rate, base=base)
    if kind == "index":
        return IndexRotary(head_dim, base=base)
    if kind == "none":
        return NoRotary()
    raise ValueError(f"unknown positions {kind!r}; expected one of {POSITION_KINDS}")
