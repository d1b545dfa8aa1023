"""From a stored clip's features to one model input: the data settings, cropping windows,
augmentation (SpecAugment-style masks, crop jitter), per-speaker statistics, and the shapes a
store dictates to the model. Pure functions of arrays and configs (no store, no torch Dataset),
shared by training (``modeling.data.dataset``) and inference (``modeling.inference.predictor``).

Cropping. A training example is a window ``[t0, t0 + L)`` of at most
``max_duration_s`` seconds with ``t0`` drawn uniformly; each stream keeps exactly
the frames whose timestamps fall inside the window, so audio and video are cut at
the same instants whatever their frame rates. Times are then **re-based to t0**
for both streams (a frame at t0 + 0.3 s gets time 0.3), so a crop looks like a
clip that starts at 0 and the model never sees where in the clip it was taken.
At evaluation the **whole clip** is used (``eval_max_duration_s=None``, the
default: CREMA-D / RAVDESS clips are under ~5 s); with a limit, a deterministic
**centre crop** of that length is taken instead (for long folder clips).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from features.clip import ClipFeatures, frames_in_window
from features.config import FeatureConfig
from modeling.network.batch import ClipExample

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB per loader: <= 3 GiB of cache per training process


@dataclass(frozen=True)
class DataConfig:
    max_duration_s: float = 4.0  # training crop length
    eval_max_duration_s: float | None = None  # None: whole clip at eval; else deterministic centre crop
    augment: bool = True  # training only; never applied at eval
    time_masks: int = 2  # SpecAugment-style masks on the log-mel
    time_mask_max_frames: int = 10  # 0.2 s at 50 fps
    freq_masks: int = 2
    freq_mask_max_bins: int = 8
    # Encoder states (Ta, L, D) only: each (layer, channel) of a training clip is set to its clip
    # mean with this probability, for the whole clip. The states' channels are unordered, so the
    # contiguous frequency masks above mean nothing there; 0.1 masks the share of channels the
    # log-mel masks do on average (2 masks of up to 8 of 80 bins). Refused on a log-mel store.
    channel_drop: float = 0.0
    crop_jitter_px: int = 4  # random shift of every face crop of a clip, in pixels
    in_memory: bool = True  # cache decoded clips (bounded by cache_bytes); False reads every clip from the store every time
    cache_bytes: int = DEFAULT_CACHE_BYTES  # per loader, split across its worker processes
    # Transductive: standardise each audio channel with its speaker's statistics over all of
    # that speaker's clips (test speakers' unlabelled clips included). Reported apart.
    speaker_norm: bool = False
    # Train on the store's speed-perturbed copies of the training clips as well (made by
    # `msata preprocess --speed-perturb`, features/speed.py); never on copies in validation or test.
    speed_copies: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.channel_drop < 1.0:
            raise ValueError(f"[data] channel_drop = {self.channel_drop}; expected a probability in [0, 1), e.g. 0.1")


# The DataConfig fields a run config sets in its [data] table (the experiment spec's ``data``);
# the other fields mirror TrainConfig's and are set in [train] only.
AUGMENT_FIELDS = (
    "time_masks",
    "time_mask_max_frames",
    "freq_masks",
    "freq_mask_max_bins",
    "channel_drop",
    "crop_jitter_px",
    "speed_copies",
)
# [data] settings added later, at the value every older run had: left out of a spec's ``data`` at that
# value, so older run keys and MLflow parameters stay as they were (as LATER_TRAIN_DEFAULTS for [train]).
LATER_DATA_DEFAULTS = {"speed_copies": False, "channel_drop": 0.0}


def crop_window(duration_s: float, max_duration_s: float | None, rng: np.random.Generator | None) -> tuple[float, float]:
    """[t0, t1) of at most ``max_duration_s``: random start with ``rng``, centred without."""
    if max_duration_s is None or duration_s <= max_duration_s:
        return 0.0, math.inf  # whole clip, whatever the streams' last timestamps
    slack = duration_s - max_duration_s
    t0 = float(rng.uniform(0.0, slack)) if rng is not None else slack / 2.0
    return t0, t0 + max_duration_s


def spec_mask(audio: np.ndarray, config: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Time and frequency masking; masked cells get the clip's mean (for log-mel, its mean
    log-energy: 0 is loud in log scale). Encoder states (Ta, L, D) get time masks and, with
    ``channel_drop`` > 0, scattered channel masks instead of frequency bands: their channels
    are not frequencies, and neighbouring channels are unrelated."""
    out = audio.copy()  # (Ta, F) or (Ta, L, D)
    if out.size == 0:
        return out
    fill = out.mean(axis=0, keepdims=True) if out.ndim == 3 else float(out.mean())
    t_len, n_bins = out.shape[0], out.shape[1]
    for _ in range(config.time_masks):
        width = int(rng.integers(0, config.time_mask_max_frames + 1))
        if 0 < width < t_len:
            start = int(rng.integers(0, t_len - width + 1))
            out[start : start + width] = fill
    if out.ndim != 2:
        if config.channel_drop > 0:  # no draw at 0: runs without it keep their augmentation stream
            dropped = rng.random(out.shape[1:]) < config.channel_drop  # (L, D)
            out[:, dropped] = fill[:, dropped]
        return out
    for _ in range(config.freq_masks):
        width = int(rng.integers(0, config.freq_mask_max_bins + 1))
        if 0 < width < n_bins:
            start = int(rng.integers(0, n_bins - width + 1))
            out[:, start : start + width] = fill
    return out


def jitter_crops(crops: np.ndarray, max_px: int, rng: np.random.Generator) -> np.ndarray:
    """Shift all crops of a clip by the same random (dy, dx), edge-padded: it mimics a
    detector's box offset while keeping the face track temporally coherent."""
    if max_px <= 0 or crops.shape[0] == 0:
        return crops
    dy, dx = (int(v) for v in rng.integers(-max_px, max_px + 1, size=2))
    size = crops.shape[1]
    padded = np.pad(crops, ((0, 0), (max_px, max_px), (max_px, max_px), (0, 0)), mode="edge")
    y0, x0 = max_px + dy, max_px + dx
    return np.ascontiguousarray(padded[:, y0 : y0 + size, x0 : x0 + size])


def audio_frame_shape(feature_config: FeatureConfig) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one audio frame as the model receives it: (F,) float32 log-mel, or
    (L, D) float16 encoder states (kept half-precision until the front-end: half the memory)."""
    encoder = feature_config.audio_encoder
    if encoder.is_log_mel:
        return (feature_config.audio.n_mels,), np.dtype(np.float32)
    return encoder.state_shape(), np.dtype(np.float16)


def video_frame_shape(feature_config: FeatureConfig) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one video frame as the model receives it: a (S, S, 3) uint8 face crop,
    or (52,) float32 blendshape scores, as the store's face representation says."""
    if feature_config.face.representation == "blendshapes":
        from features.face_landmarks import N_BLENDSHAPES

        return (N_BLENDSHAPES,), np.dtype(np.float32)
    size = feature_config.face.crop_size
    return (size, size, 3), np.dtype(np.uint8)


def model_input_settings(feature_config: FeatureConfig) -> dict[str, int | str]:
    """The model settings a store dictates (its audio input, face representation and crop size); one place for the rule."""
    from features.audio_encoders.registry import PACKAGED_ENCODERS

    encoder = feature_config.audio_encoder
    layers, width = (0, 0) if encoder.is_log_mel else encoder.state_shape()
    packaged = PACKAGED_ENCODERS.get(encoder.name)
    heads = packaged.n_heads if packaged is not None else 0  # only packaged encoders can be fine-tuned
    return {
        "n_mels": feature_config.audio.n_mels,
        "crop_size": feature_config.face.crop_size,
        "audio_layers": layers,
        "audio_width": width,
        "audio_heads": heads,
        "video_input": feature_config.face.representation,  # "crops" | "blendshapes": which video front-end
    }


AudioStats = tuple[np.ndarray, np.ndarray]  # (mean, std), each of one frame's shape, float32


def audio_statistics(clips: Iterable[ClipFeatures]) -> AudioStats | None:
    """Per-channel mean and std over every audio frame of ``clips``; None when none has audio."""
    total, total_sq, count = None, None, 0
    for clip in clips:
        frames = clip.audio_features
        if frames is None or len(frames) == 0:
            continue
        x = np.asarray(frames, dtype=np.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        count += len(x)
    if total is None:
        return None
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def speaker_normalised(features: ClipFeatures, stats: AudioStats | None) -> ClipFeatures:
    """The clip with its audio frames standardised by ``stats`` (same dtype as stored)."""
    frames = features.audio_features
    if stats is None or frames is None:
        return features
    mean, std = stats
    scaled = ((np.asarray(frames, dtype=np.float32) - mean) / std).astype(frames.dtype)
    field_name = "logmel" if features.logmel is not None else "audio_states"
    return replace(features, **{field_name: scaled})


def features_to_example(
    features: ClipFeatures,
    feature_config: FeatureConfig,
    label: int,
    window: tuple[float, float],
    config: DataConfig | None = None,
    rng: np.random.Generator | None = None,
) -> ClipExample:
    """Cut ``features`` to ``window`` (times re-based to its start) and apply augmentation
    when ``rng`` is given. Shared by training and inference so both see the same inputs."""
    t0, t1 = window
    frame_shape, audio_dtype = audio_frame_shape(feature_config)
    video_shape, video_dtype = video_frame_shape(feature_config)
    stored = features.audio_features
    if stored is not None and features.audio_times is not None:
        keep = frames_in_window(np.asarray(features.audio_times), window)
        audio = np.asarray(stored, dtype=audio_dtype)[keep]  # (Ta, F) or (Ta, L, D)
        audio_times = np.asarray(features.audio_times)[keep] - t0
    else:
        audio, audio_times = np.zeros((0, *frame_shape), audio_dtype), np.zeros((0,), np.float64)
    frames = features.video_features  # crops or blendshapes, whichever the store holds
    if frames is not None and features.video_times is not None:
        if tuple(frames.shape[1:]) != video_shape:
            raise ValueError(
                f"clip {features.clip_id!r}: video frames of shape {tuple(frames.shape[1:])}, the feature config gives {video_shape}"
            )
        keep = frames_in_window(np.asarray(features.video_times), window)
        video = np.asarray(frames, dtype=video_dtype)[keep]  # (Tv, S, S, 3) uint8 or (Tv, 52) float32
        video_times = np.asarray(features.video_times)[keep] - t0
        mask = np.asarray(features.face_mask, dtype=bool)[keep] if features.face_mask is not None else np.ones(len(video), bool)
    else:
        video = np.zeros((0, *video_shape), video_dtype)
        video_times, mask = np.zeros((0,), np.float64), np.zeros((0,), bool)
    if rng is not None and config is not None and config.augment:
        audio = spec_mask(audio, config, rng)
        if video.ndim == 4:  # a pixel shift means nothing for blendshape scores
            video = jitter_crops(video, config.crop_jitter_px, rng)
    return ClipExample(
        audio=torch.from_numpy(np.ascontiguousarray(audio)),
        audio_times=torch.from_numpy(audio_times.astype(np.float32)),
        video=torch.from_numpy(np.ascontiguousarray(video)),
        video_times=torch.from_numpy(video_times.astype(np.float32)),
        face_mask=torch.from_numpy(mask),
        label=int(label),
        clip_id=features.clip_id,
    )
