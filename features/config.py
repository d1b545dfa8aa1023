"""Feature configuration: one frozen dataclass per concern, hashed to key caches.

A feature store records the exact config it was built with; a store built with
another config is refused rather than silently mixed (see storage.FeatureStore).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from features.audio_encoders.registry import LOG_MEL, packaged_encoder


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
class AudioEncoderConfig:
    """Which audio representation a store holds: ``"log-mel"`` (the AudioConfig spectrogram) or
    the hidden states of a packaged pretrained encoder (``"whisper-base"``, ``"whisper-tiny.en"``).

    ``layers`` picks the hidden states kept (0 = the input embedding, k = block k's output);
    empty keeps all of them. ``weights_sha256`` is the identity of the weights: it is filled in
    from the registry, so it enters the config hash and stores of two encoders never mix.
    """

    name: str = LOG_MEL
    layers: tuple[int, ...] = ()
    weights_sha256: str = ""
    window_s: float = 30.0  # long files are encoded in windows of this length (Whisper: at most 30 s)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.name == LOG_MEL:
            if self.layers or self.weights_sha256:
                raise ValueError(f"audio encoder {LOG_MEL!r} takes no layers or weights, got {self}")
            return
        spec = packaged_encoder(self.name)  # ValueError naming the known encoders
        if self.weights_sha256 and self.weights_sha256 != spec.sha256:
            raise ValueError(
                f"audio encoder {self.name!r} is recorded with weights {self.weights_sha256[:12]}..., "
                f"the installed registry pins {spec.sha256[:12]}...: features from other weights cannot be mixed"
            )
        object.__setattr__(self, "weights_sha256", spec.sha256)
        bad = [i for i in self.layers if not 0 <= i <= spec.n_layers]
        if bad or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {list(self.layers)} of {self.name!r}: each must be unique and in 0..{spec.n_layers}")
        if not 0 < self.window_s <= 30.0:
            raise ValueError(f"window_s={self.window_s}: must be in (0, 30] seconds (Whisper has 30 s of positions)")

    @property
    def is_log_mel(self) -> bool:
        return self.name == LOG_MEL

    def state_indices(self) -> tuple[int, ...]:
        """Hidden states stored, in order (encoders only)."""
        return self.layers or tuple(range(packaged_encoder(self.name).n_states))

    def state_shape(self) -> tuple[int, int]:
        """(L, D) of one stored frame (encoders only)."""
        return len(self.state_indices()), packaged_encoder(self.name).width


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
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    # Bump when the stored layout or the maths changes. 2: audio and video read from one
    # container keep its clock (their start offsets survive); 1: each stream starts at 0.
    format_version: int = 2

    def __post_init__(self) -> None:
        if not self.audio_encoder.is_log_mel and self.audio.sample_rate != 16_000:
            raise ValueError(f"audio encoder {self.audio_encoder.name!r} needs 16 kHz audio, the config decodes at {self.audio.sample_rate} Hz")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Log-mel stores predate the encoder choice: leaving the default out keeps their hash.
        if self.audio_encoder.is_log_mel:
            del data["audio_encoder"]
        else:
            data["audio_encoder"]["layers"] = list(self.audio_encoder.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureConfig":
        """Inverse of ``to_dict``; a missing key takes the one default the dataclass defines."""
        unknown = set(data) - {"audio", "face", "audio_encoder", "format_version"}
        if unknown:
            raise ValueError(f"unknown feature-config keys: {sorted(unknown)}")
        return cls(
            audio=AudioConfig(**data.get("audio", {})),
            face=FaceConfig(**data.get("face", {})),
            audio_encoder=AudioEncoderConfig(**data.get("audio_encoder", {})),
            format_version=int(data.get("format_version", cls.__dataclass_fields__["format_version"].default)),
        )

    def config_hash(self) -> str:
        """Stable 12-hex-digit hash of the canonical JSON form."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]
