"""Feature configuration: one frozen dataclass per concern, hashed to key caches.

A feature store records the exact config it was built with; a store built with
another config is refused rather than silently mixed (see storage.FeatureStore).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16_000
    n_mels: int = 80
    win_length_s: float = 0.025  # 25 ms analysis window
    hop_length_s: float = 0.020  # 20 ms hop -> 50 frames per second
    n_fft: int = 512
    fmin: float = 20.0
    fmax: float = 7_600.0
    log_floor: float = 1e-6  # added before log so silence stays finite

    @property
    def frames_per_second(self) -> float:
        return 1.0 / self.hop_length_s


@dataclass(frozen=True)
class FaceConfig:
    crop_size: int = 96  # square RGB uint8 crop side in pixels
    margin: float = 0.25  # extra context around the detected box, as a fraction of its side
    detect_max_side: int = 320  # frames are downscaled so their longest side is at most this for MTCNN
    detect_every: int = 1  # run MTCNN on every k-th frame and interpolate boxes between detections
    min_probability: float = 0.90  # detections below this count as "no face"
    min_face_size: int = 20  # MTCNN min_face_size, in detection-resolution pixels


@dataclass(frozen=True)
class FeatureConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    # Bump when the stored layout or the maths changes. 2: audio and video read from one
    # container keep its clock (their start offsets survive); 1: each stream starts at 0.
    format_version: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureConfig":
        return cls(
            audio=AudioConfig(**data.get("audio", {})),
            face=FaceConfig(**data.get("face", {})),
            format_version=int(data.get("format_version", 1)),
        )

    def config_hash(self) -> str:
        """Stable 12-hex-digit hash of the canonical JSON form."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]
