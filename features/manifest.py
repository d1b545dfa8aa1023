"""Typed manifest rows shared by every dataset recipe (lhotse-style)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

# What a clip id may be: one path component of the feature store, <= 150 characters (the store's
# staging names add ~60 more under the 255-byte file-name limit). Recipes keep their ids inside it;
# the store refuses any other.
MAX_CLIP_ID = 150
SAFE_ID = re.compile(rf"^[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_CLIP_ID - 1}}}$")


class ClipNameError(ValueError):
    """A file name that does not follow its corpus' naming scheme."""


@dataclass(frozen=True)
class ClipRecord:
    """One clip of a corpus, before any decoding.

    ``audio_path`` / ``video_path`` say where each modality is read from; they may
    be the same file (an .mp4 with sound) and either may be None (audio-only or
    silent video corpora). ``clip_id`` is unique within a dataset and safe as a
    path component.
    """

    clip_id: str
    dataset: str
    speaker: str
    label: str
    audio_path: str | None
    video_path: str | None
    intensity: str | None = None
    sentence: str | None = None
    split: str | None = None  # only when the user's CSV fixes one
    # A speed-perturbed training copy (features/speed.py): the clip it was made from and the
    # factor as text ("0.9"); both None for a recording itself.
    source_clip_id: str | None = None
    speed: str | None = None

    @property
    def has_audio(self) -> bool:
        return self.audio_path is not None

    @property
    def has_video(self) -> bool:
        return self.video_path is not None

    @property
    def speed_factor(self) -> float:
        return float(self.speed) if self.speed is not None else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Rejection:
    """A file a recipe saw but could not turn into a clip, with the reason."""

    path: str
    reason: str


@dataclass
class RecipeResult:
    records: list[ClipRecord] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
