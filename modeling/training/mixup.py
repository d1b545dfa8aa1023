"""Mixup on a training batch (``train.mixup_alpha``; Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization").

Why: on ~1,000 recordings of a dozen speakers the frozen-Whisper model drives its training loss to ~0.01
within ten epochs, memorising the training speakers (docs/results.md). Mixup trains on convex combinations
of two clips and of their labels, which needs nothing beyond the precomputed features in the store (a
pretrained encoder's states cannot be perturbed after the fact, so augmentation has to work on them as they are).

One ``lam ~ Beta(alpha, alpha)`` per batch and a random partner for every clip (a permutation of the batch):

- features: ``lam * x + (1 - lam) * x[partner]`` for every stream, each clip's invalid frames (padding, frames
  without a face) counted as zeros, so where only one of the two clips has a frame it enters scaled by its weight
  (clips are aligned at their first frame, as the padded batch holds them); uint8 face crops are rounded back;
- masks: the union, a frame is valid where either clip has one; times: the clip's own where it has the frame,
  else its partner's (a frame's time is what TaRoPE rotates by);
- loss: ``lam * CE(y) + (1 - lam) * CE(y[partner])`` (``train_loop._objective``); CTM, when on, reads the mixed
  streams as one clip and counts once.

Validation, test, the pooled probe and inference never mix.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from modeling.network.batch import Batch


def draw_mixup(batch_size: int, alpha: float) -> tuple[float, torch.Tensor]:
    """(lam, partner (B,) int64) from the global torch RNG (seeded by the train loop and restored on resume)."""
    if alpha <= 0:
        raise ValueError(f"mixup_alpha={alpha}: expected > 0 (0 turns mixup off)")
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return lam, torch.randperm(batch_size)


def _mix_stream(
    x: torch.Tensor, times: torch.Tensor, mask: torch.Tensor, lam: float, partner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, *frame), times (B, T), mask (B, T) -> the mixed three."""
    if x.shape[1] == 0:  # a stream the batch does not hold (audio-only or video-only)
        return x, times, mask
    valid = mask.reshape(*mask.shape, *([1] * (x.dim() - 2))).to(torch.float32)  # (B, T, 1, ...)
    own = x.to(torch.float32) * valid
    mixed = lam * own + (1.0 - lam) * own[partner]
    if not x.dtype.is_floating_point:  # uint8 face crops
        info = torch.iinfo(x.dtype)
        mixed = mixed.round().clamp(info.min, info.max)
    other_mask = mask[partner]
    return mixed.to(x.dtype), torch.where(mask, times, times[partner]), mask | other_mask


def mix_batch(batch: Batch, lam: float, partner: torch.Tensor) -> Batch:
    """The batch with every clip mixed with ``batch[partner]`` at weight ``lam``; labels and ids stay the
    clip's own (the train loop weighs in the partner's labels)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup weight lam={lam}; expected a value in [0, 1]")
    if partner.shape != (len(batch),):
        raise ValueError(f"partner of shape {tuple(partner.shape)} for a batch of {len(batch)} clips")
    partner = partner.to(batch.labels.device)
    audio, audio_times, audio_mask = _mix_stream(batch.audio, batch.audio_times, batch.audio_mask, lam, partner)
    video, video_times, video_mask = _mix_stream(batch.video, batch.video_times, batch.video_mask, lam, partner)
    return replace(
        batch, audio=audio, audio_times=audio_times, audio_mask=audio_mask, video=video, video_times=video_times, video_mask=video_mask
    )
