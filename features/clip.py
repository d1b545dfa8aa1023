"""The extracted features of one clip: what a feature store writes and reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Each stream's timestamps and the arrays of ClipFeatures that hold one row per timestamp.
TIMED_ARRAYS = {
    "audio_times": ("logmel", "audio_states"),
    "video_times": ("face_crops", "face_blendshapes", "face_mask", "face_boxes", "face_landmarks", "face_probs"),
}


def frames_in_window(times: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Boolean (T,) mask of the frames a time window [t0, t1) keeps: ``t0 <= time < t1``, every frame when t1 is
    not finite. The one rule for crops (``modeling.data.examples``) and windowed reads (``FeatureStore.read``)."""
    t0, t1 = window
    if not math.isfinite(t1):
        return np.ones(times.shape, dtype=bool)
    return (times >= t0) & (times < t1)


class ClipError(ValueError):
    """A clip that cannot be processed (corrupt, empty, no usable stream).

    The message always names the offending file and the reason; a pipeline
    records it as one failure and goes on with the other clips.
    """


@dataclass
class ClipFeatures:
    """Timestamped features of one clip. Times are seconds from the clip start.

    Audio (None when the clip has no usable audio); one of logmel / audio_states, as the
    feature config's audio encoder says:
      logmel       (Ta, n_mels) float32   log-mel ("log-mel" encoder)
      audio_states (Ta, L, D)   float16   hidden states of a pretrained encoder (L stored layers)
      audio_times  (Ta,)        float64  centre time of each frame
    Video (None when the clip has no video, or no face in any frame); face_crops or
    face_blendshapes, as the feature config's face representation says:
      face_crops     (Tv, S, S, 3) uint8  RGB square crops ("crops"); past features.spill.SPILL_BYTES
                                          (long clips) a read-only np.memmap over a nameless temporary
                                          file, freed with the array (pickling it copies it into memory)
      face_blendshapes (Tv, 52)    float32  MediaPipe blendshape scores, 0 where no face ("blendshapes")
      video_times    (Tv,)         float64  presentation time of each frame
      face_mask      (Tv,)         bool     False where no face was found
      face_boxes     (Tv, 4)       float32  x1, y1, x2, y2 in source-frame pixels
      face_landmarks (Tv, 5, 2)    float32  eyes, nose, mouth corners, source pixels
      face_probs     (Tv,)         float32  detection probability (0 where none)
    """

    clip_id: str
    duration_s: float
    logmel: np.ndarray | None = None
    audio_states: np.ndarray | None = None
    audio_times: np.ndarray | None = None
    face_crops: np.ndarray | None = None
    video_times: np.ndarray | None = None
    face_mask: np.ndarray | None = None
    face_boxes: np.ndarray | None = None
    face_landmarks: np.ndarray | None = None
    face_probs: np.ndarray | None = None
    face_blendshapes: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)  # e.g. "no face in any frame: kept audio-only"

    @property
    def has_audio(self) -> bool:
        return self.audio_features is not None

    @property
    def audio_features(self) -> np.ndarray | None:
        """The per-frame audio array, whichever representation the clip holds: (Ta, ...)."""
        return self.logmel if self.logmel is not None else self.audio_states

    @property
    def n_audio_frames(self) -> int:
        features = self.audio_features
        return 0 if features is None else len(features)

    @property
    def video_features(self) -> np.ndarray | None:
        """The per-frame face array, whichever representation the clip holds: (Tv, ...)."""
        return self.face_crops if self.face_crops is not None else self.face_blendshapes

    @property
    def has_video(self) -> bool:
        return self.video_features is not None

    @property
    def face_ratio(self) -> float:
        if self.face_mask is None or len(self.face_mask) == 0:
            return 0.0
        return float(np.mean(self.face_mask))
