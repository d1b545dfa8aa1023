"""Batch contract between the data loader and the model.

A ``ClipExample`` is one (possibly cropped) clip as tensors; ``collate`` pads a
list of them into a ``Batch``. A missing modality is a zero-length sequence, so
an audio-only batch has ``video`` of shape (B, 0, S, S, 3) (crops) or (B, 0, 52)
(blendshapes). Video frames are whatever the store's face representation holds
(``modeling.data.examples.video_frame_shape``); the model's video front-end is chosen to match.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ClipExample:
    audio: torch.Tensor  # (Ta, F) float32 log-mel or (Ta, L, D) float16 encoder states; Ta may be 0
    audio_times: torch.Tensor  # (Ta,) float32 seconds
    video: torch.Tensor  # (Tv, S, S, 3) uint8 face crops or (Tv, 52) float32 blendshapes; Tv may be 0
    video_times: torch.Tensor  # (Tv,) float32 seconds
    face_mask: torch.Tensor  # (Tv,) bool, False where no face was found
    label: int  # class index, -1 when unknown (inference)
    clip_id: str


@dataclass
class Batch:
    audio: torch.Tensor  # (B, Ta, F) float32 log-mel or (B, Ta, L, D) float16 encoder states, zero-padded
    audio_times: torch.Tensor  # (B, Ta) float32 seconds
    audio_mask: torch.Tensor  # (B, Ta) bool, True = real frame
    video: torch.Tensor  # (B, Tv, S, S, 3) uint8 crops or (B, Tv, 52) float32 blendshapes, zero-padded
    video_times: torch.Tensor  # (B, Tv) float32 seconds
    video_mask: torch.Tensor  # (B, Tv) bool, True = real frame with a face
    labels: torch.Tensor  # (B,) int64
    clip_ids: list[str]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        # Called by DataLoader(pin_memory=True) on custom batch types.
        pinned = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in pinned.items():
            if torch.is_tensor(value):
                pinned[name] = value.pin_memory()
        return Batch(**pinned)

    def __len__(self) -> int:
        return self.labels.shape[0]


def _pad_stack(seqs: list[torch.Tensor], length: int, fill: float | bool | int = 0) -> torch.Tensor:
    """Stack (T_i, *rest) tensors into (B, length, *rest), padding with ``fill``."""
    first = seqs[0]
    out = torch.full((len(seqs), length, *first.shape[1:]), fill, dtype=first.dtype)
    for i, seq in enumerate(seqs):
        out[i, : seq.shape[0]] = seq
    return out


def collate(examples: list[ClipExample]) -> Batch:
    if not examples:
        raise ValueError("collate() got an empty list of examples")
    for name in ("audio", "video"):
        # Padding needs one frame shape per stream; a mix means examples from different feature configs.
        shapes = {(tuple(getattr(e, name).shape[1:]), getattr(e, name).dtype) for e in examples}
        if len(shapes) > 1:
            raise ValueError(
                f"collate() got {name} frames of different shapes/dtypes {sorted(map(str, shapes))}: examples from different feature configs"
            )
    ta = max(e.audio.shape[0] for e in examples)
    tv = max(e.video.shape[0] for e in examples)
    audio_mask = torch.zeros(len(examples), ta, dtype=torch.bool)
    for i, e in enumerate(examples):
        audio_mask[i, : e.audio.shape[0]] = True
    return Batch(
        audio=_pad_stack([e.audio for e in examples], ta),
        audio_times=_pad_stack([e.audio_times for e in examples], ta),
        audio_mask=audio_mask,
        video=_pad_stack([e.video for e in examples], tv),
        video_times=_pad_stack([e.video_times for e in examples], tv),
        video_mask=_pad_stack([e.face_mask for e in examples], tv, False),
        labels=torch.tensor([e.label for e in examples], dtype=torch.long),
        clip_ids=[e.clip_id for e in examples],
    )
