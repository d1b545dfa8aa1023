"""Training data: a torch Dataset over a FeatureStore (no feature computation here).

Examples are made by ``modeling.data.examples`` (cropping, augmentation, speaker statistics).

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

Long clips. When the dataset knows the clips' durations (``durations``, from the store's
manifest) and a clip is more than :data:`WINDOWED_READ_RATIO` times longer than its crop
(``max_duration_s`` in training, ``eval_max_duration_s`` at evaluation when set), an example
reads only the crop's frames from the store (``FeatureStore.read(window=...)``): a 4 s crop
of a 10-minute clip reads ~4 s of features, not 10 minutes of them. The crop is drawn from the
same generator in the same order as for a whole read, so the example is the same. An evaluation
crop (the centre, the same every epoch) is cached like a clip; a training crop is not (the next
epoch crops elsewhere), so a clip of 4-15 crops that the cache could have held whole is now read
a crop per epoch: the price of never holding a long clip whole. Shorter clips (every RAVDESS and
CREMA-D clip) are read whole and cached as before; so are all clips with ``speaker_norm``, whose
statistics need whole clips.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from features.clip import ClipFeatures
from features.config import FeatureConfig
from modeling.data.examples import (
    AudioStats,
    DataConfig,
    audio_statistics,
    crop_window,
    features_to_example,
    speaker_normalised,
)
from modeling.network.batch import ClipExample, collate

# Detector outputs no training example is made of: never read for training (about a tenth of
# a clip's chunks). A skip list, not a keep list, so arrays that stores gain are read.
NOT_TRAINING_INPUTS = ("face_boxes", "face_landmarks", "face_probs")
# A clip longer than this many crops is read one crop at a time (module docstring, "Long clips"). Re-reading a
# crop every epoch costs a fraction of the clip; caching the whole clip would cost the whole clip's memory.
WINDOWED_READ_RATIO = 4.0


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

    def __contains__(self, key: str) -> bool:  # neither a hit nor a miss, and the order is left as it is
        return key in self._items

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


class ClipReader(Protocol):
    """What ClipDataset reads from: a FeatureStore, or a benchmark's in-memory features."""

    def read(self, clip_id: str, skip: object = ..., window: tuple[float, float] | None = None) -> ClipFeatures: ...


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
        reader: ClipReader | None = None,
        durations: Sequence[float] | None = None,
    ) -> None:
        """``reader``: read clips from it instead of opening ``store_path`` (a benchmark's in-memory
        features); shipped to loader workers as is. ``durations``: each clip's ``duration_s`` as the
        store's manifest gives it, which lets long clips be read one crop at a time (module docstring)."""
        if len(clip_ids) != len(labels):
            raise ValueError(f"{len(clip_ids)} clip ids but {len(labels)} labels")
        if durations is not None and len(durations) != len(clip_ids):
            raise ValueError(f"{len(clip_ids)} clip ids but {len(durations)} durations")
        self.durations = [float(d) for d in durations] if durations is not None else None
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
        self._reader = reader
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

    def _cache_of(self) -> ClipCache:
        if self._cache is None:
            self._cache = ClipCache(self.cache_bytes)
        return self._cache

    def _features(self, clip_id: str) -> ClipFeatures:
        cached = self._cache_of().get(clip_id)
        if cached is not None:
            return cached
        features = self._source().read(clip_id, skip=NOT_TRAINING_INPUTS)
        self._cache.put(clip_id, features)
        return features

    def _source(self) -> ClipReader:
        """The reader, or the store opened in this process on first use."""
        if self._store is None and self._reader is not None:
            self._store = self._reader
        elif self._store is None:
            from storage.feature_store import FeatureStore

            self._store = FeatureStore.open(self.store_path)
        return self._store

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

    def _reads_window(self, index: int, crop_s: float | None) -> bool:
        """Whether clip ``index`` is read one crop at a time (module docstring, "Long clips")."""
        if self.durations is None or crop_s is None or self.config.speaker_norm:
            return False
        if self._cache is not None and self.clip_ids[index] in self._cache:
            return False  # held already: whole, or (evaluation) the very crop this read would take
        return self.durations[index] > WINDOWED_READ_RATIO * crop_s

    def __getitem__(self, key: int | tuple[int, int]) -> ClipExample:
        index, epoch = (key, None) if isinstance(key, (int, np.integer)) else key
        clip_id = self.clip_ids[index]
        rng = np.random.default_rng([self.config.seed, epoch if epoch is not None else 0, index]) if self.train else None
        crop_s = self.config.max_duration_s if self.train else self.config.eval_max_duration_s
        if self._reads_window(index, crop_s):
            window = crop_window(self.durations[index], crop_s, rng)
            features = self._source().read(clip_id, skip=NOT_TRAINING_INPUTS, window=window)
            if not self.train:  # an evaluation crop is the same every epoch: cached like a whole clip, and read from there
                self._cache_of().put(clip_id, features)
        else:
            features = self._features(clip_id)
            if self.config.speaker_norm:
                assert self.speakers is not None
                features = speaker_normalised(features, self._speaker_statistics(self.speakers[index]))
            window = crop_window(features.duration_s, crop_s, rng)
        if self.train:
            return features_to_example(features, self.feature_config, self.labels[index], window, self.config, rng)
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


def reseeded(loader: DataLoader, seed: int | None = None) -> DataLoader:
    """A new loader like ``loader`` (made by :func:`make_loader`) that has never been iterated; for a training
    loader, its crops, augmentation and batch order come from ``seed`` (the loader's own without one).

    What :func:`make_loader` with that seed makes, without reading the clips again: the dataset is a shallow
    copy sharing this process's clip cache (``train.members`` trains each member on the fold's one training
    set); worker processes, when there are any, are new and fill their own. New matters beyond the seed: a
    DataLoader draws its workers' base seed from the global torch RNG when an iterator is made, which a
    persistent-workers loader does once only, so a member reusing an iterated loader would skip a draw a
    standalone run makes, and train with other dropout masks."""
    dataset = copy.copy(loader.dataset)
    workers = {"num_workers": loader.num_workers, "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory}
    if loader.num_workers > 0:
        workers |= {"persistent_workers": True, "prefetch_factor": loader.prefetch_factor}
    sampler = loader.batch_sampler
    if isinstance(sampler, ShardedBatchSampler):  # training
        seed = sampler.seed if seed is None else seed
        dataset.config = replace(dataset.config, seed=seed)
        batches = ShardedBatchSampler(len(dataset), sampler.batch_size, seed, sampler.rank, sampler.world_size)
        return DataLoader(dataset, batch_sampler=batches, **workers)
    if seed is not None or not isinstance(loader.sampler, StridedSampler):
        raise ValueError("reseeded() takes a loader made by make_loader, and a seed only for a training loader")
    return DataLoader(dataset, batch_size=loader.batch_size, sampler=loader.sampler, shuffle=False, drop_last=False, **workers)
