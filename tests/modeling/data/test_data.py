"""Dataset over a feature store: synchronous crops, re-based times, modalities, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from training_fixtures import LABELS, TINY_FEATURES, build_tiny_store, tiny_clip

from modeling.data.dataset import ClipDataset, make_loader
from modeling.data.examples import DataConfig, crop_window, features_to_example, spec_mask


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("store") / "tiny"
    build_tiny_store(path, n_speakers=2, clips_per_speaker=6)
    return str(path)


def dataset(store_path: str, train: bool, **kw) -> ClipDataset:
    from storage.feature_store import FeatureStore

    m = FeatureStore.open(store_path).manifest()
    return ClipDataset(store_path, m["clip_id"].tolist(), [LABELS.index(x) for x in m["label"]], TINY_FEATURES, DataConfig(**kw), train)


def test_crop_window() -> None:
    assert crop_window(3.0, None, None) == (0.0, math.inf)
    assert crop_window(3.0, 4.0, np.random.default_rng(0)) == (0.0, math.inf)  # short clip: whole
    assert crop_window(6.0, 4.0, None) == (1.0, 5.0)  # deterministic centre crop
    rng = np.random.default_rng(0)
    for _ in range(50):
        t0, t1 = crop_window(6.0, 4.0, rng)
        assert 0.0 <= t0 <= 2.0 and t1 == pytest.approx(t0 + 4.0)


def test_crop_cuts_both_streams_at_the_same_instants() -> None:
    clip = tiny_clip("c", 2, 6, 3.0, np.random.default_rng(1))
    ex = features_to_example(clip, TINY_FEATURES, 2, (0.7, 1.9))
    # exactly the frames whose absolute times fall in [0.7, 1.9), re-based to 0.7
    want_a = clip.audio_times[(clip.audio_times >= 0.7) & (clip.audio_times < 1.9)] - 0.7
    want_v = clip.video_times[(clip.video_times >= 0.7) & (clip.video_times < 1.9)] - 0.7
    assert torch.allclose(ex.audio_times, torch.from_numpy(want_a).float())
    assert torch.allclose(ex.video_times, torch.from_numpy(want_v).float())
    assert ex.audio.shape == (len(want_a), 16) and ex.video.shape == (len(want_v), 16, 16, 3)
    first_v = int(np.argmax(clip.video_times >= 0.7))
    assert torch.equal(ex.video[0], torch.from_numpy(clip.face_crops[first_v]))  # no augmentation without rng
    assert ex.face_mask.dtype == torch.bool and ex.label == 2


def test_missing_modalities_become_empty_sequences() -> None:
    rng = np.random.default_rng(0)
    audio_only = features_to_example(tiny_clip("a", 0, 6, 2.0, rng, video=False), TINY_FEATURES, 0, (0.0, math.inf))
    video_only = features_to_example(tiny_clip("v", 0, 6, 2.0, rng, audio=False), TINY_FEATURES, 0, (0.0, math.inf))
    assert audio_only.video.shape == (0, 16, 16, 3) and audio_only.video_times.shape == (0,)
    assert audio_only.audio.shape[0] == 100
    assert video_only.audio.shape == (0, 16) and video_only.video.shape[0] == 50


def test_train_items_are_random_but_reproducible(store_path: str) -> None:
    ds = dataset(store_path, train=True, max_duration_s=1.0)
    a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(0, 2)]
    assert torch.equal(a.audio, b.audio) and torch.equal(a.video_times, b.video_times)
    assert not torch.equal(a.audio, c.audio)  # another epoch: another crop / mask
    for ex in (a, c):
        assert ex.audio_times.numel() == 0 or float(ex.audio_times.max()) < 1.0
        assert ex.video_times.numel() == 0 or float(ex.video_times.max()) < 1.0


def test_eval_items_are_whole_and_deterministic(store_path: str) -> None:
    ds = dataset(store_path, train=False, max_duration_s=1.0)
    ex = ds[0]
    feats = ds._features(ds.clip_ids[0])
    assert ex.audio.shape[0] == feats.logmel.shape[0]  # whole clip, unaugmented
    assert torch.equal(ex.audio, torch.from_numpy(feats.logmel))
    centre = dataset(store_path, train=False, eval_max_duration_s=1.0)[0]
    assert torch.equal(centre.audio, dataset(store_path, train=False, eval_max_duration_s=1.0)[0].audio)
    assert float(centre.audio_times.max()) < 1.0


class RecordingReader:
    """A FeatureStore that notes the window of every read."""

    def __init__(self, path: str) -> None:
        from storage.feature_store import FeatureStore

        self.store, self.reads = FeatureStore.open(path), []

    def read(self, clip_id: str, skip=(), window=None):
        self.reads.append((clip_id, window))
        return self.store.read(clip_id, skip=skip, window=window)


def test_long_clips_are_read_one_crop_at_a_time_and_give_the_same_examples(store_path: str) -> None:
    from storage.feature_store import FeatureStore

    m = FeatureStore.open(store_path).manifest()
    ids, labels, durations = m["clip_id"].tolist(), [LABELS.index(x) for x in m["label"]], m["duration_s"].tolist()
    assert min(durations) > 4 * 0.5  # every tiny clip is more than four 0.5 s crops long
    for train, settings in ((True, {"max_duration_s": 0.5}), (False, {"eval_max_duration_s": 0.5})):
        config = DataConfig(**settings)
        whole = ClipDataset(store_path, ids, labels, TINY_FEATURES, config, train)
        reader = RecordingReader(store_path)
        windowed = ClipDataset(store_path, ids, labels, TINY_FEATURES, config, train, reader=reader, durations=durations)
        keys = [(i, epoch) for i in range(len(ids)) for epoch in (0, 1)] if train else list(range(len(ids))) * 2
        for key in keys:
            a, b = whole[key], windowed[key]
            for name in ("audio", "audio_times", "video", "video_times", "face_mask"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (key, name)
        assert all(window is not None for _, window in reader.reads)
        if train:  # a training crop is never cached: one read per example
            assert len(reader.reads) == len(keys) and (windowed._cache is None or len(windowed._cache) == 0)
        else:  # the evaluation crop is the same every epoch: read once, then from the cache
            assert len(reader.reads) == len(ids) and len(windowed._cache) == len(ids)
    # A crop of a quarter of the clip or more: the clip is read whole, once, and cached, as always.
    reader = RecordingReader(store_path)
    ds = ClipDataset(store_path, ids, labels, TINY_FEATURES, DataConfig(max_duration_s=1.0), True, reader=reader, durations=durations)
    ds[(0, 0)], ds[(0, 1)]
    assert reader.reads == [(ids[0], None)] and len(ds._cache) == 1
    with pytest.raises(ValueError, match="durations"):
        ClipDataset(store_path, ids, labels, TINY_FEATURES, DataConfig(), True, durations=durations[:-1])


def test_spec_mask_fills_with_clip_mean() -> None:
    x = np.arange(200, dtype=np.float32).reshape(50, 4)
    cfg = DataConfig(time_masks=1, time_mask_max_frames=10, freq_masks=1, freq_mask_max_bins=2)
    out = spec_mask(x, cfg, np.random.default_rng(3))
    changed = out != x
    assert changed.any() and np.all(out[changed] == x.mean())
    assert np.array_equal(x, np.arange(200, dtype=np.float32).reshape(50, 4))  # input untouched


def test_channel_drop_masks_whole_state_channels_with_their_clip_mean() -> None:
    rng = np.random.default_rng(0)
    states = rng.normal(size=(40, 3, 64)).astype(np.float32)  # (Ta, L, D) encoder states
    cfg = DataConfig(time_masks=0, channel_drop=0.25)
    out = spec_mask(states, cfg, np.random.default_rng(5))
    changed = (out != states).any(axis=0)  # (L, D): a dropped cell is dropped in every frame
    assert np.array_equal((out != states).all(axis=0), changed)
    assert 0.15 < changed.mean() < 0.35  # about a quarter of the 192 cells
    np.testing.assert_allclose(out[:, changed], np.broadcast_to(states.mean(axis=0)[changed], (40, int(changed.sum()))))
    # The frequency masks leave encoder states alone, and at 0 nothing is drawn: older runs keep their crops and masks.
    quiet = np.random.default_rng(5)
    before = quiet.bit_generator.state
    assert np.array_equal(spec_mask(states, DataConfig(time_masks=0, freq_masks=2, channel_drop=0.0), quiet), states)
    assert quiet.bit_generator.state == before
    with pytest.raises(ValueError, match="channel_drop = 1.0"):
        DataConfig(channel_drop=1.0)


def test_in_memory_cache_and_pickling(store_path: str) -> None:
    import pickle

    ds = dataset(store_path, train=True, in_memory=True)
    ds[(0, 0)]
    assert ds._store is not None and len(ds._cache) == 1
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._store is None  # store handles never cross process boundaries
    assert clone._cache is None  # nor do the parent's cached clips
    no_cache = dataset(store_path, train=True, in_memory=False)
    no_cache[(0, 0)]
    assert len(no_cache._cache) == 0


def test_cache_is_bounded_in_bytes_and_least_recently_used() -> None:
    from modeling.data.dataset import ClipCache, clip_nbytes

    rng = np.random.default_rng(0)
    clips = [tiny_clip(f"c{i}", i % 6, 6, 2.0, rng) for i in range(5)]
    size = clip_nbytes(clips[0])
    assert size == sum(
        a.nbytes for a in (clips[0].logmel, clips[0].audio_times, clips[0].face_crops, clips[0].video_times, clips[0].face_mask)
    )
    cache = ClipCache(int(2.5 * size))  # room for two clips
    for clip in clips[:2]:
        cache.put(clip.clip_id, clip)
    assert cache.get("c0") is clips[0]  # c0 is now the most recently used
    cache.put("c2", clips[2])
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.get("c1") is None and cache.get("c0") is clips[0] and cache.get("c2") is clips[2]
    tiny = ClipCache(size // 2)
    tiny.put("c3", clips[3])  # larger than the whole budget: not kept
    assert len(tiny) == 0 and tiny.nbytes == 0
    with pytest.raises(ValueError, match="-1"):
        ClipCache(-1)


def test_loader_splits_the_cache_budget_and_reads_only_training_arrays(store_path: str) -> None:
    ds = dataset(store_path, train=True, cache_bytes=1000)
    make_loader(ds, 4, 2, seed=0)
    assert ds.cache_bytes == 500  # two worker processes share the loader's budget
    features = dataset(store_path, train=True)._features(ds.clip_ids[0])
    assert features.face_crops is not None and features.face_boxes is None  # boxes/landmarks are not training inputs


def test_sharded_batches_are_the_single_process_batches_split_by_rank() -> None:
    from modeling.data.dataset import EpochSampler, ShardedBatchSampler

    n, batch = 11, 4  # steps of 4, 4 and 3 clips
    single = ShardedBatchSampler(n, batch, seed=3)
    single.set_epoch(2)
    whole = list(single)
    sampler = EpochSampler(n, 3)
    sampler.set_epoch(2)
    assert [k for b in whole for k in b] == list(sampler)  # the same keys, in the same order, as before sharding
    for world in (2, 3, 4, 5):
        ranks = [ShardedBatchSampler(n, batch, seed=3, rank=r, world_size=world) for r in range(world)]
        for r in ranks:
            r.set_epoch(2)
        shares = [r.step_shares() for r in ranks]
        assert all(len(s) == len(whole) for s in shares)  # every rank takes every step (the all-reduce)
        per_rank = [iter(list(r)) for r in ranks]
        for step, global_batch in enumerate(whole):
            parts = [next(it) if shares[r][step][0] else [] for r, it in enumerate(per_rank)]
            assert sorted(k for p in parts for k in p) == sorted(global_batch)  # disjoint, and together the batch
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1 and all(shares[r][step] == (sizes[r], len(global_batch)) for r in range(world))
        assert all(next(it, None) is None for it in per_rank)
    with pytest.raises(ValueError, match="rank 2"):
        ShardedBatchSampler(n, batch, seed=0, rank=2, world_size=2)


def test_interleave_restores_the_order_of_a_strided_split() -> None:
    from modeling.data.dataset import StridedSampler
    from modeling.training.distributed import interleave

    for n, world in ((7, 2), (7, 3), (2, 3), (0, 2)):
        parts = [list(StridedSampler(n, r, world)) for r in range(world)]
        assert interleave(parts) == list(range(n))


@pytest.mark.slow
def test_worker_loader_matches_single_process(store_path: str) -> None:
    batches = {}
    for workers in (0, 2):
        loader = make_loader(dataset(store_path, train=True, max_duration_s=1.0), 4, workers, seed=5)
        loader.batch_sampler.set_epoch(3)
        batches[workers] = list(loader)
    assert len(batches[0]) == 3
    for b0, b2 in zip(batches[0], batches[2], strict=False):
        assert b0.clip_ids == b2.clip_ids
        assert torch.equal(b0.audio, b2.audio) and torch.equal(b0.video, b2.video)
        assert torch.equal(b0.audio_mask, b2.audio_mask)


def test_speaker_statistics_standardise_each_channel() -> None:
    from features.clip import ClipFeatures
    from modeling.data.examples import audio_statistics, speaker_normalised

    rng = np.random.default_rng(0)
    clips = [
        ClipFeatures(
            f"c{i}", 1.0, audio_states=(3.0 + 2.0 * rng.standard_normal((50, 2, 4))).astype(np.float16), audio_times=np.arange(50) * 0.02
        )
        for i in range(4)
    ]
    stats = audio_statistics(clips)
    assert stats is not None and stats[0].shape == (2, 4)
    joined = np.concatenate([speaker_normalised(c, stats).audio_states.astype(np.float64) for c in clips])
    assert np.allclose(joined.mean(0), 0.0, atol=1e-2) and np.allclose(joined.std(0), 1.0, atol=1e-2)
    assert audio_statistics([ClipFeatures("v", 1.0)]) is None  # no audio: nothing to normalise
