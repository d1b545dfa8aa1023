"""Properties of TaRoPE, checked on the functions the model runs: ``time_positions`` /
``index_positions`` -> ``Rotary`` -> ``rotate`` (``test_encoder`` checks that the model's attention
does call them on the positions ``rotary_positions`` chose)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling.network.encoder import rotary_positions
from modeling.network.tarope import (
    Rotary,
    index_positions,
    inverse_frequencies,
    rotary_angles,
    rotate,
    time_positions,
)


def apply_rotary(x: torch.Tensor, times: torch.Tensor, rate: float = 50.0) -> torch.Tensor:
    """TaRoPE of x (B, H, T, Dh) at times (B, T) seconds, through the model's own code path."""
    return rotate(x, Rotary(x.shape[-1])(time_positions(times, rate)))


def reference_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Independent complex-number RoPE (float64): pair (x_i, x_{i+d/2}) is the number x_i + j x_{i+d/2},
    multiplied by exp(j * p * base^(-2i/d)) for integer position p."""
    d = x.shape[-1]
    half = d // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())  # (B, H, T, d/2)
    freqs = torch.tensor([base ** (-2.0 * i / d) for i in range(half)], dtype=torch.float64)
    phase = torch.polar(torch.ones(()).double(), positions.double()[:, None, :, None] * freqs)  # (B, 1, T, d/2)
    r = z * phase
    return torch.cat([r.real, r.imag], dim=-1)


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q @ k.transpose(-1, -2)  # (B, H, Tq, Tk)


def test_angles_formula() -> None:
    times = torch.tensor([[0.0, 0.02, 1.5]])
    angles = rotary_angles(time_positions(times, rate=50.0), inverse_frequencies(8, base=10_000.0))  # (1, 3, 4)
    assert angles.shape == (1, 3, 4) and angles.dtype == torch.float32
    for t_idx, t in enumerate([0.0, 0.02, 1.5]):
        for i in range(4):
            expected = t * 50.0 * 10_000.0 ** (-2 * i / 8)
            assert math.isclose(angles[0, t_idx, i].item(), expected, rel_tol=1e-6, abs_tol=1e-7)


def test_equals_standard_rope_when_rate_times_t_is_the_index() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 16)
    index = torch.arange(40, dtype=torch.float32).expand(2, 40)
    times = index / 50.0  # audio frame k at k/50 s keeps position k
    ours = apply_rotary(x, times, rate=50.0)
    torch.testing.assert_close(ours.double(), reference_rope(x, index), atol=2e-4, rtol=1e-4)
    # Index positions are standard RoPE on indices.
    torch.testing.assert_close(index_positions(times), index)
    q = rotate(x, Rotary(16)(index_positions(times)))
    torch.testing.assert_close(q.double(), reference_rope(x, index), atol=2e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-20.0, 20.0), seed=st.integers(0, 10_000))
def test_scores_depend_only_on_time_differences(shift: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    tq = torch.rand(1, 7, generator=g) * 4.0  # arbitrary float times: any frame rate, jitter
    tk = torch.rand(1, 9, generator=g) * 4.0
    base_scores = scores(apply_rotary(q, tq), apply_rotary(k, tk))
    shifted = scores(apply_rotary(q, tq + shift), apply_rotary(k, tk + shift))
    # Float32 angles of |t| <= 24 s at 50/s: phase error ~1e-4 rad per unit norm.
    torch.testing.assert_close(shifted, base_scores, atol=5e-3, rtol=1e-3)


def test_scores_do_change_with_relative_offset() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    t0 = torch.zeros(1, 1)
    s_same = scores(apply_rotary(q, t0), apply_rotary(k, t0))
    s_off = scores(apply_rotary(q, t0), apply_rotary(k, t0 + 0.1))
    assert not torch.allclose(s_same, s_off, atol=1e-3)


def test_same_instant_same_rotation_across_modalities() -> None:
    # Audio at 50 Hz and video at 30 Hz meet at t = 0, 0.1, 0.2 ... s.
    audio_t = torch.arange(50, dtype=torch.float32) / 50.0
    video_t = torch.arange(30, dtype=torch.float32) / 30.0
    times = torch.cat([audio_t, video_t]).unsqueeze(0)  # (1, 80)
    x = torch.randn(1, 1, 1, 8).expand(1, 1, 80, 8).contiguous()  # the same vector everywhere
    rotated = apply_rotary(x, times)
    for t in (0.0, 0.1, 0.2, 0.5, 0.9):
        ia = int(round(t * 50))
        iv = 50 + int(round(t * 30))
        torch.testing.assert_close(rotated[0, 0, ia], rotated[0, 0, iv], atol=1e-5, rtol=1e-5)
    # ...while index positions (audio k, video j) do not line up at t = 0.5 s.
    index = rotary_positions("index", [audio_t.unsqueeze(0), video_t.unsqueeze(0)])
    torch.testing.assert_close(index, torch.cat([torch.arange(50.0), torch.arange(30.0)]).unsqueeze(0))
    qi = rotate(x, Rotary(8)(index))
    assert not torch.allclose(qi[0, 0, 25], qi[0, 0, 50 + 15], atol=1e-3)


def test_norm_preserved() -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 4, 20, 32)
    times = torch.rand(3, 20) * 10
    torch.testing.assert_close(apply_rotary(x, times).norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)


def test_bf16_close_to_float32_and_keeps_dtype() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 64, 32)
    times = torch.rand(2, 64) * 8
    out16 = apply_rotary(x.to(torch.bfloat16), times)
    assert out16.dtype == torch.bfloat16
    out32 = apply_rotary(x.to(torch.bfloat16).float(), times)  # same inputs, float32 output
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=1e-2)


def test_positions_per_kind_and_none_is_identity() -> None:
    torch.manual_seed(4)
    q = torch.randn(2, 2, 10, 8)
    audio_t, video_t = torch.rand(2, 6) * 3, torch.rand(2, 4) * 3
    tarope = rotary_positions("tarope", [audio_t, video_t], rate=50.0)
    torch.testing.assert_close(tarope, torch.cat([audio_t, video_t], dim=1) * 50.0, rtol=0, atol=0)
    index = rotary_positions("index", [audio_t, video_t])
    assert index.tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 1.0, 2.0, 3.0]] * 2
    assert rotary_positions("none", [audio_t, video_t]) is None
    rotary = Rotary(8)
    assert rotary(None) is None and rotate(q, rotary(None)) is q
    assert not list(rotary.state_dict())  # inv_freq is derived, not stored in checkpoints


def test_rejects_unknown_kind_and_odd_width() -> None:
    with pytest.raises(ValueError, match="wavelet"):
        rotary_positions("wavelet", [torch.zeros(1, 1)])
    with pytest.raises(ValueError, match="even"):
        Rotary(7)
