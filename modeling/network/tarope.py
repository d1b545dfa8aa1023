"""TaRoPE: rotary position embeddings driven by real timestamps.

Standard RoPE rotates feature pair i of a token at integer position p by the
angle p * base^(-2i/d). TaRoPE replaces p by ``rate * t`` where t is the
token's timestamp in seconds, so an audio token and a video token taken at the
same instant get exactly the same rotation, and q.k after rotation depends only
on t_q - t_k whatever the frame rates. With ``rate = 50`` an audio frame k at
t = k/50 keeps position k, i.e. TaRoPE reduces to plain RoPE on the audio stream.

One formula, in three steps, each a pure function with positions passed explicitly
(as in torchtune and rotary-embedding-torch):

    positions = time_positions(times, rate)         # TaRoPE; index_positions(times) for the ablation
    rotation  = Rotary(head_dim, base)(positions)   # once per forward: cos/sin of positions * base^(-2i/d)
    q, k      = rotate(q, rotation), rotate(k, rotation)   # in every attention layer

The encoder (``modeling.network.encoder.rotary_positions``) chooses the positions once
per forward ("tarope", "index" or "none" = no rotation at all); :class:`Rotary` only turns
positions into a rotation and holds no parameters (its inverse frequencies are a derived,
non-persistent buffer, so checkpoints hold none of it). Angles and the rotation are
computed in float32 and cast back to the input dtype.

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
POSITION_KINDS = ("tarope", "index", "none")


def time_positions(times: torch.Tensor, rate: float = DEFAULT_RATE) -> torch.Tensor:
    """TaRoPE positions ``rate * t``: times (..., T) seconds -> (..., T) float32."""
    return times.to(torch.float32) * rate


def index_positions(times: torch.Tensor) -> torch.Tensor:
    """Standard RoPE positions of one stream: each token's index 0..T-1 in it, times (B, T) -> (B, T) float32."""
    b, t = times.shape
    return torch.arange(t, device=times.device, dtype=torch.float32).expand(b, t)


def inverse_frequencies(dim: int, base: float = DEFAULT_BASE) -> torch.Tensor:
    """base^(-2i/dim) for i in [0, dim/2) as float32, shape (dim/2,)."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even number, got {dim}")
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles p * base^(-2i/dim): positions (..., T) -> (..., T, dim/2) float32."""
    return positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)


@dataclass
class Rotation:
    """cos/sin of the rotary angles, ready to broadcast against (B, H, T, Dh)."""

    cos: torch.Tensor  # (B, 1, T, Dh/2) float32
    sin: torch.Tensor  # (B, 1, T, Dh/2) float32


def rotation_for(positions: torch.Tensor, inv_freq: torch.Tensor) -> Rotation:
    """positions (B, T) -> Rotation with a head axis inserted."""
    angles = rotary_angles(positions, inv_freq).unsqueeze(1)  # (B, 1, T, Dh/2)
    return Rotation(cos=angles.cos(), sin=angles.sin())


def rotate(x: torch.Tensor, rotation: Rotation | None) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+Dh/2}) of x (B, H, T, Dh) by the given angles; None = no rotation (x itself).

    Computed in float32 (bf16 angles lose the phase of high positions) and cast
    back to x's dtype.
    """
    if rotation is None:
        return x
    if rotation.cos.shape[-2] != x.shape[-2] or 2 * rotation.cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"x {tuple(x.shape)} does not match a rotation of (T, Dh/2) = {tuple(rotation.cos.shape[-2:])}")
    half = x.shape[-1] // 2
    xf = x.to(torch.float32)
    x1, x2 = xf[..., :half], xf[..., half:]  # (B, H, T, Dh/2) each
    cos, sin = rotation.cos, rotation.sin
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class Rotary(nn.Module):
    """Positions (B, T) -> the Rotation every attention layer applies; None -> None (no positions)."""

    def __init__(self, head_dim: int, base: float = DEFAULT_BASE) -> None:
        super().__init__()
        # Not persistent: derived from head_dim/base, so checkpoints stay config-only.
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, base), persistent=False)

    def forward(self, positions: torch.Tensor | None) -> Rotation | None:
        return None if positions is None else rotation_for(positions, self.inv_freq)
