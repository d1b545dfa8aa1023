"""Mixup on a training batch (``train.mixup_alpha``; Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization").

Why: on ~1,000 recordings of a dozen speakers the frozen-Whisper model drives its training loss to ~0.01
within ten epochs, memorising the training speakers (docs/results.md). Mixup trains on convex combinations
of two clips and of their labels, which needs nothing beyond the precomputed features in the store (a
pretrained encoder's states cannot be perturbed after the fact, so augmentation has to work on them as they are).

One ``lam ~ Beta(alpha, alpha)`` per global batch and a random partner for every clip (a permutation of the
rank's share of the batch), drawn from a generator keyed by (seed, epoch, step), so a resumed run, any number
of loader workers and every rank see the same draws as an uninterrupted run:

- the mixed clip keeps the frames, frame mask and times of its *dominant* clip (the one weighted ``>= 0.5``):
  clips are aligned at their first frame (as the padded batch holds them), frames both clips have become
  ``lam x + (1 - lam) x[partner]``, frames only the dominant clip has enter scaled by its weight, and frames
  only the other clip has are dropped. Why not the union of the masks: a front-end that normalises each frame
  (the encoder-state one, ``F.layer_norm`` per layer) undoes any scale, so a short clip mixed at weight 0.98 would
  gain its partner's tail at full strength while its label says 98 % itself (found in review, session 12);
- each clip's invalid frames (padding, frames without a face) count as zeros; uint8 face crops are rounded back;
- loss: ``lam * CE(y) + (1 - lam) * CE(y[partner])`` (``train_loop._objective``); CTM, when on, reads the mixed
  streams as one clip and counts once.

Validation, test, the pooled probe and inference never mix.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from modeling.network.batch import Batch


def draw_mixup(batch_size: int, alpha: float, seed: int, epoch: int, step: int, rank: int = 0) -> tuple[float, torch.Tensor]:
    """(lam, partner (B,) int64) for one training step: lam is the same on every rank, the partners are
    drawn within this rank's share of the batch."""
    if not alpha > 0:
        raise ValueError(f"mixup_alpha={alpha}: expected > 0 (0 turns mixup off)")
    lam = float(np.random.default_rng((seed, epoch, step)).beta(alpha, alpha))
    partner = np.random.default_rng((seed, epoch, step, rank + 1)).permutation(batch_size)
    return lam, torch.from_numpy(partner).long()


def _mix_stream(
    x: torch.Tensor, times: torch.Tensor, mask: torch.Tensor, lam: float, partner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, *frame), times (B, T), mask (B, T) -> the mixed three, each row on its dominant clip's frames."""
    if x.shape[1] == 0:  # a stream the batch does not hold (audio-only or video-only)
        return x, times, mask
    valid = mask.reshape(*mask.shape, *([1] * (x.dim() - 2))).to(torch.float32)  # (B, T, 1, ...)
    own = x.to(torch.float32) * valid
    other = own[partner]  # a copy (advanced indexing), taken before own is scaled in place
    mixed = own.mul_(lam).add_(other, alpha=1.0 - lam)
    out_mask, out_times = (mask, times) if lam >= 0.5 else (mask[partner], times[partner])
    mixed.mul_(out_mask.reshape(valid.shape).to(torch.float32))  # frames only the other clip has: dropped
    if not x.dtype.is_floating_point:  # uint8 face crops
        info = torch.iinfo(x.dtype)
        mixed = mixed.round_().clamp_(info.min, info.max)
    return mixed.to(x.dtype), out_times, out_mask


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
