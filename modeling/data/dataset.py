"""Training data: a torch Dataset over a FeatureStore (no feature computation here).

Cropping. A training example is a window ``[t0, t0 + L)`` of at most
``max_duration_s`` seconds with ``t0`` drawn uniformly; each stream keeps exactly
the frames whose timestamps fall inside the window, so audio and video are cut at
the same instants whatever their frame rates. Times are then **re-based to t0**
for both streams (a frame at t0 + 0.3 s gets time 0.3), so a crop looks like a
clip that starts at 0 and the model never sees where in the clip it was taken.
At evaluation the **whole clip** is used (``eval_max_duration_s=None``, the
default: CREMA-D / RAVDESS clips are under ~5 s); with a limit, a deterministic
**centre crop** of that length is taken instead (for long folder clips).

Randomness. Random crops and augmentation draw from a generator seeded by
``(seed, epoch, index)``: the :class:`EpochSampler` hands ``(index, epoch)`` keys to
the workers, so an epoch is identical whatever the number of workers and after a
resume. With several training processes, :class:`ShardedBatchSampler` cuts the same
permutation into global batches and gives each rank a strided share of each
(``modeling/training/distributed.py``), so the keys, and hence crops and augmentation, are the
ones a single process would draw.

Memory. Clips are read from the Zarr store on demand, only the arrays training
uses. Each reading process keeps a least-recently-used :class:`ClipCache` of decoded
clips bounded in bytes: a loader's ``cache_bytes`` is shared equally by its worker
processes (1 GiB per loader by default; a training process has at most three
loaders: train, validation, test). Prefetching is the DataLoader's: ``num_workers``
processes each keep ``prefetch_factor`` batches ready.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from features.clip import ClipFeatures
from features.config import FeatureConfig
from modeling.network.batch import ClipExample, collate

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB per loader: <= 3 GiB of cache per training process
# Detector outputs no training example is made of: never read for training (about a tenth of
# a clip's chunks). A skip list, not a keep list, so arrays that stores gain are read.
NOT_TRAINING_INPUTS = ("face_boxes", "face_landmarks", "face_probs")


@dataclass(frozen=True)
class DataConfig:
    max_duration_s: float = 4.0  # training crop length
    eval_max_duration_s: float | None = None  # None: whole clip at eval; else deterministic centre crop
    augment: bool = True  # training only; never applied at eval
    time_masks: int = 2  # SpecAugment-style masks on the log-mel
    time_mask_max_frames: int = 10  # 0.2 s at 50 fps
    freq_masks: int = 2
    freq_mask_max_bins: int = 8
    crop_jitter_px: int = 4  # random shift of every face crop of a clip, in pixels
    in_memory: bool = True  # cache decoded clips (bounded by cache_bytes); False reads every clip from the store every time
    cache_bytes: int = DEFAULT_CACHE_BYTES  # per loader, split across its worker processes
    # Transductive: standardise each audio channel with its speaker's statistics over all of
    # that speaker's clips (test speakers' unlabelled clips included). Reported apart.
    speaker_norm: bool = False
    seed: int = 0


# The DataConfig fields a run config sets in its [data] table (the experiment spec's ``data``);
# the other fields mirror TrainConfig's and are set in [train] only.
AUGMENT_FIELDS = ("time_masks", "time_mask_max_frames", "freq_masks", "freq_mask_max_bins", "crop_jitter_px")


def crop_window(duration_s: float, max_duration_s: float | None, rng: np.random.Generator | None) -> tuple[float, float]:
    """[t0, t1) of at most ``max_duration_s``: random start with ``rng``, centred without."""
    if max_duration_s is None or duration_s <= max_duration_s:
        return 0.0, math.inf  # whole clip, whatever the streams' last timestamps
    slack = duration_s - max_duration_s
    t0 = float(rng.uniform(0.0, slack)) if rng is not None else slack / 2.0
    return t0, t0 + max_duration_s


def _select(times: np.ndarray, t0: float, t1: float) -> np.ndarray:
    if not math.isfinite(t1):
        return np.ones(times.shape, dtype=bool)
    return (times >= t0) & (times < t1)


def spec_mask(audio: np.ndarray, config: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Time and frequency masking; masked cells get the clip's mean (for log-mel, its mean
    log-energy: 0 is loud in log scale). Encoder states (Ta, L, D) get time masks only:
    their channels are not frequencies, and neighbouring channels are unrelated."""
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
        keep = _select(np.asarray(features.audio_times), t0, t1)
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
        keep = _select(np.asarray(features.video_times), t0, t1)
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


def clip_nbytes(features: ClipFeatures) -> int:
    return sum(int(v.nbytes) for f in fields(features) if isinstance(v := getattr(features, f.name), np.ndarray))


class ClipCache:
    """Decoded clips, least recently used first out, never more than ``max_bytes`` in all.
    A clip larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes, self.nbytes = int(max_bytes), 0
        self.hits = self.misses = 0
        self._items: OrderedDict[str, tuple[ClipFeatures, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> ClipFeatures | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, features: ClipFeatures) -> None:
        size = clip_nbytes(features)
        if size > self.max_bytes or key in self._items:
            return
        while self.nbytes + size > self.max_bytes:
            _, (_, freed) = self._items.popitem(last=False)
            self.nbytes -= freed
        self._items[key] = (features, size)
        self.nbytes += size


class ClipDataset(Dataset):
    """Clips of a feature store as ClipExamples.

    The store is opened lazily in each process that reads (DataLoader workers
    included) and is never pickled. Keys are an index (eval, deterministic) or an
    ``(index, epoch)`` pair from :class:`EpochSampler` (train, random crop + aug).
    """

    def __init__(
        self,
        store_path: str,
        clip_ids: Sequence[str],
        labels: Sequence[int],
        feature_config: FeatureConfig,
        config: DataConfig,
        train: bool,
        speakers: Sequence[str] | None = None,
    ) -> None:
        if len(clip_ids) != len(labels):
            raise ValueError(f"{len(clip_ids)} clip ids but {len(labels)} labels")
        if config.speaker_norm and (speakers is None or len(speakers) != len(clip_ids)):
            raise ValueError("speaker_norm needs one speaker per clip id")
        self.speakers = list(speakers) if speakers is not None else None
        self._speaker_stats: dict[str, AudioStats | None] | None = None
        self.store_path = str(store_path)
        self.clip_ids = list(clip_ids)
        self.labels = [int(v) for v in labels]
        self.feature_config = feature_config
        self.config = config
        self.train = train
        self._store = None
        self.cache_bytes = config.cache_bytes if config.in_memory else 0  # this process's budget; make_loader splits it
        self._cache: ClipCache | None = None

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None  # zarr/fsspec handles are per process
        state["_cache"] = None  # each worker fills its own; never ship the parent's clips
        return state

    def _features(self, clip_id: str) -> ClipFeatures:
        if self._cache is None:
            self._cache = ClipCache(self.cache_bytes)
        cached = self._cache.get(clip_id)
        if cached is not None:
            return cached
        if self._store is None:
            from storage.feature_store import FeatureStore

            self._store = FeatureStore.open(self.store_path)
        features = self._store.read(clip_id, skip=NOT_TRAINING_INPUTS)
        self._cache.put(clip_id, features)
        return features

    def _speaker_statistics(self, speaker: str) -> AudioStats | None:
        """Each speaker's clips in this dataset are all of that speaker's clips in the fold:
        folds are speaker-independent, so no other split holds them."""
        if self._speaker_stats is None:
            assert self.speakers is not None
            by_speaker: dict[str, list[str]] = {}
            for clip_id, spk in zip(self.clip_ids, self.speakers, strict=False):
                by_speaker.setdefault(spk, []).append(clip_id)
            self._speaker_stats = {spk: audio_statistics(self._features(c) for c in ids) for spk, ids in by_speaker.items()}
        return self._speaker_stats[speaker]

    def __getitem__(self, key: int | tuple[int, int]) -> ClipExample:
        index, epoch = (key, None) if isinstance(key, (int, np.integer)) else key
        clip_id = self.clip_ids[index]
        features = self._features(clip_id)
        if self.config.speaker_norm:
            assert self.speakers is not None
            features = speaker_normalised(features, self._speaker_statistics(self.speakers[index]))
        if self.train:
            rng = np.random.default_rng([self.config.seed, epoch if epoch is not None else 0, index])
            window = crop_window(features.duration_s, self.config.max_duration_s, rng)
            return features_to_example(features, self.feature_config, self.labels[index], window, self.config, rng)
        window = crop_window(features.duration_s, self.config.eval_max_duration_s, None)
        return features_to_example(features, self.feature_config, self.labels[index], window)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of an epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class EpochSampler(Sampler):
    """Seeded shuffle per epoch yielding (index, epoch) keys; ``set_epoch`` before iterating."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in epoch_permutation(self.n, self.seed, self.epoch):
            yield index, self.epoch


class ShardedBatchSampler(Sampler):
    """This rank's share of each global batch of the epoch permutation, as lists of (index, epoch).

    Global batch k is ``perm[k*B:(k+1)*B]``; rank r takes its positions r, r + W, ... So
    the ranks' step-k shares are disjoint and together are the single-process batch k;
    in the last, uneven batch they differ by at most one clip. A rank whose share of a
    step is empty yields nothing for that step: :meth:`step_shares` says, per step, how
    many clips this rank holds and how many the global batch holds (the loss weights).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world_size, self.epoch = n, batch_size, seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        return [perm[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]

    def step_shares(self) -> list[tuple[int, int]]:
        """(clips of this rank, clips of the global batch) for every step of the epoch."""
        return [(len(batch[self.rank :: self.world_size]), len(batch)) for batch in self.global_batches()]

    def __len__(self) -> int:
        """Non-empty shares only: the batches this rank's loader yields."""
        return sum(1 for mine, _ in self.step_shares() if mine)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches():
            share = batch[self.rank :: self.world_size]
            if share:
                yield [(index, self.epoch) for index in share]


class StridedSampler(Sampler):
    """Evaluation: indices rank, rank + W, ... in order (``distributed.interleave`` restores the order)."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def make_loader(
    dataset: ClipDataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    prefetch_factor: int = 4,
) -> DataLoader:
    """Shuffled (train) or ordered (eval) DataLoader collating into modeling.network.batch.Batch.

    Training batches come from a :class:`ShardedBatchSampler` (``batch_size`` is the
    global batch, one process or several); evaluation reads this rank's strided share
    in order. The dataset's cache budget is split across the worker processes."""
    dataset.cache_bytes = (dataset.config.cache_bytes if dataset.config.in_memory else 0) // max(1, num_workers)
    workers = {"num_workers": num_workers, "collate_fn": collate, "pin_memory": pin_memory}
    if num_workers > 0:
        # Workers keep their store handle and cache across epochs; each keeps prefetch_factor batches ready.
        workers |= {"persistent_workers": True, "prefetch_factor": prefetch_factor}
    if dataset.train:
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(len(dataset), batch_size, seed, rank, world_size), **workers)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=StridedSampler(len(dataset), rank, world_size), shuffle=False, drop_last=False, **workers
    )


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_examples / batch_size))
