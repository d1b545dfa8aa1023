"""Feature configuration: one frozen dataclass per concern, hashed to key caches.

A feature store records the exact config it was built with; a store built with
another config is refused rather than silently mixed (see storage.FeatureStore).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from features.audio_encoders.registry import HF_PREFIX, LOG_MEL, is_hf_checkpoint, packaged_encoder
from features.config_keys import reject_unknown_keys


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
    """Which audio representation a store holds: ``"log-mel"`` (the AudioConfig spectrogram), the
    hidden states of a packaged pretrained encoder (``"whisper-base"``, ``"whisper-tiny.en"``), or
    those of a local Hugging Face checkpoint directory, ``"hf:/abs/path"`` (whisper, wav2vec2,
    hubert, wavlm; see ``audio_encoders/hf_checkpoint.py``).

    ``layers`` picks the hidden states kept (0 = the input embedding, k = block k's output);
    empty keeps all of them. ``weights_sha256`` is the identity of the weights: filled in from the
    registry, or for a checkpoint from its model.safetensors when the config is first made, so it
    enters the config hash and stores of two encoders never mix. A checkpoint's ``model_type``,
    ``n_layers`` and ``width`` are recorded beside it, so that a recorded config (a store, a
    model) says its shape without the checkpoint: training needs only the stored states.
    """

    name: str = LOG_MEL
    layers: tuple[int, ...] = ()
    weights_sha256: str = ""
    window_s: float = 30.0  # long files are encoded in windows of this length (Whisper: at most 30 s)
    model_type: str = ""  # Hugging Face checkpoints only (the packaged encoders' shapes are in the registry)
    n_layers: int = 0
    width: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.name == LOG_MEL:
            if self.layers or self.weights_sha256 or self.model_type or self.n_layers or self.width:
                raise ValueError(f"audio encoder {LOG_MEL!r} takes no layers or weights, got {self}")
            return
        if is_hf_checkpoint(self.name):
            self._identify_checkpoint()
        else:
            self._identify_packaged()
        n_layers = self.n_layers or packaged_encoder(self.name).n_layers
        bad = [i for i in self.layers if not 0 <= i <= n_layers]
        if bad or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {list(self.layers)} of {self.name!r}: each must be unique and in 0..{n_layers}")
        if not 0 < self.window_s <= 30.0:
            raise ValueError(f"window_s={self.window_s}: must be in (0, 30] seconds (Whisper has 30 s of positions)")

    def _identify_packaged(self) -> None:
        spec = packaged_encoder(self.name)  # ValueError naming the known encoders
        if self.model_type or self.n_layers or self.width:
            raise ValueError(f"audio encoder {self.name!r}: model_type, n_layers and width are for hf: checkpoints only")
        if self.weights_sha256 and self.weights_sha256 != spec.sha256:
            raise ValueError(
                f"audio encoder {self.name!r} is recorded with weights {self.weights_sha256[:12]}..., "
                f"the installed registry pins {spec.sha256[:12]}...: features from other weights cannot be mixed"
            )
        object.__setattr__(self, "weights_sha256", spec.sha256)

    def _identify_checkpoint(self) -> None:
        """A new config reads its identity from the directory; a recorded one (sha256 given) is
        taken as recorded and touches no file, so a training worker needs no checkpoint. Whether
        the file is still the recorded one is checked whenever the encoder is loaded."""
        from features.audio_encoders import hf_checkpoint

        directory = self.name[len(HF_PREFIX) :]
        if not directory:
            raise ValueError(f"audio encoder {self.name!r}: name the checkpoint directory, e.g. hf:/models/wav2vec2-base")
        object.__setattr__(self, "name", HF_PREFIX + hf_checkpoint.absolute_directory(directory))
        recorded = (self.model_type, self.n_layers, self.width)
        if self.weights_sha256:
            if not all(recorded):
                raise ValueError(f"audio encoder {self.name!r}: a recorded config needs model_type, n_layers and width, got {recorded}")
            return
        info = hf_checkpoint.read_checkpoint(self.name[len(HF_PREFIX) :])  # CheckpointError (a ValueError) when unusable
        if any(recorded) and recorded != (info.model_type, info.n_layers, info.width):
            raise ValueError(f"audio encoder {self.name!r} is a {info.model_type} of {info.n_layers} x {info.width}, not {recorded}")
        for key, value in (
            ("weights_sha256", info.sha256),
            ("model_type", info.model_type),
            ("n_layers", info.n_layers),
            ("width", info.width),
        ):
            object.__setattr__(self, key, value)

    @property
    def is_log_mel(self) -> bool:
        return self.name == LOG_MEL

    @property
    def is_hf_checkpoint(self) -> bool:
        return is_hf_checkpoint(self.name)

    def state_indices(self) -> tuple[int, ...]:
        """Hidden states stored, in order (encoders only)."""
        n_layers = self.n_layers or packaged_encoder(self.name).n_layers
        return self.layers or tuple(range(n_layers + 1))

    def state_shape(self) -> tuple[int, int]:
        """(L, D) of one stored frame (encoders only)."""
        return len(self.state_indices()), self.width or packaged_encoder(self.name).width

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        if not self.is_hf_checkpoint:  # packaged encoders' stores predate these keys: leaving them out keeps their hash
            for key in ("model_type", "n_layers", "width"):
                del data[key]
        return data


FACE_REPRESENTATIONS = ("crops", "blendshapes")
FACE_SEARCHES = ("full", "near", "track")


@dataclass(frozen=True)
class FaceConfig:
    """How faces are stored. ``representation``: "crops" (MTCNN face crops, the other fields) or
    "blendshapes" (52 MediaPipe FaceLandmarker expression scores per frame, features/face_landmarks.py;
    the crop and MTCNN fields are then unused)."""

    crop_size: int = 96  # square RGB uint8 crop side in pixels
    margin: float = 0.25  # extra context around the detected box, as a fraction of its side
    detect_max_side: int = 320  # frames are downscaled so their longest side is at most this for MTCNN
    detect_every: int = 1  # run MTCNN on every k-th frame and interpolate boxes between detections
    min_probability: float = 0.90  # detections below this count as "no face"
    min_face_size: int = 20  # MTCNN min_face_size, in detection-resolution pixels
    representation: str = "crops"  # "crops" | "blendshapes" (FACE_REPRESENTATIONS)
    # Where MTCNN looks (FACE_SEARCHES): "full" = the whole frame at every pyramid scale; "near" = around
    # the previous frame's face at the scales of its size, with the whole frame whenever that finds none
    # and every features.faces.NEAR_REFRESH frames (several times cheaper; agreement in docs/benchmarks.md);
    # "track" = no P-net or R-net between whole-frame searches: O-net alone confirms the box it saw for the
    # previous frame's face (moved with it), with the whole frame when it finds none there and every
    # features.faces.TRACK_REFRESH frames (fastest; boxes differ from "full" by a few pixels).
    search: str = "full"

    def __post_init__(self) -> None:
        if self.representation not in FACE_REPRESENTATIONS:
            raise ValueError(f"face representation {self.representation!r}; expected one of {FACE_REPRESENTATIONS}")
        if self.search not in FACE_SEARCHES:
            raise ValueError(f"face search {self.search!r}; expected one of {FACE_SEARCHES}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.search == "full":
            del data["search"]  # stores of the full search predate the choice: leaving it out keeps their hash
        if self.representation == "crops":
            del data["representation"]  # crop stores predate the choice: leaving it out keeps their hash
        else:  # the packaged model's identity enters the hash, so stores of two models never mix
            from features.face_landmarks import TASK_SHA256

            data["landmarker_sha256"] = TASK_SHA256
        return data


def _face_from_dict(data: dict[str, Any]) -> FaceConfig:
    data = dict(data)
    recorded = data.pop("landmarker_sha256", None)
    face = FaceConfig(**data)
    if recorded is not None:
        from features.face_landmarks import TASK_SHA256

        if recorded != TASK_SHA256:
            raise ValueError(
                f"face landmarker sha256 {recorded[:12]}... recorded, this install pins {TASK_SHA256[:12]}...: blendshapes of other weights cannot be mixed"
            )
    return face


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
            raise ValueError(
                f"audio encoder {self.audio_encoder.name!r} needs 16 kHz audio, the config decodes at {self.audio.sample_rate} Hz"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Log-mel stores predate the encoder choice: leaving the default out keeps their hash.
        data["face"] = self.face.to_dict()
        if self.audio_encoder.is_log_mel:
            del data["audio_encoder"]
        else:
            data["audio_encoder"] = self.audio_encoder.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        """Inverse of ``to_dict``; a missing key takes the one default the dataclass defines."""
        reject_unknown_keys(data, cls, "feature-config")
        return cls(
            audio=AudioConfig(**data.get("audio", {})),
            face=_face_from_dict(data.get("face", {})),
            audio_encoder=AudioEncoderConfig(**data.get("audio_encoder", {})),
            format_version=int(data.get("format_version", cls.__dataclass_fields__["format_version"].default)),
        )

    def config_hash(self) -> str:
        """Stable 12-hex-digit hash of the canonical JSON form."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]
