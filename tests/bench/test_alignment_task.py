"""The synthetic synchrony task carries its label only in cross-modal timing."""

from __future__ import annotations

import pytest
import torch

from bench.alignment_task import TaskConfig, event_times, generate, training_seed

TASK = TaskConfig()


def test_generate_is_deterministic_and_balanced():
    a, b = generate(64, TASK, seed=3), generate(64, TASK, seed=3)
    assert torch.equal(a.audio, b.audio) and torch.equal(a.video, b.video) and torch.equal(a.labels, b.labels)
    assert int(a.labels.sum()) == 32
    assert not torch.equal(generate(64, TASK, seed=4).audio, a.audio)


def test_shapes_rates_and_video_offset():
    data = generate(8, TASK, seed=0)
    assert data.audio.shape == (8, 100, TASK.n_mels) and data.video.shape == (8, 60, TASK.crop, TASK.crop, 3)
    assert torch.allclose(data.audio_times.diff(dim=1), torch.full((8, 99), 0.02))
    assert torch.allclose(data.video_times.diff(dim=1), torch.full((8, 59), 1 / 30), atol=1e-6)
    offsets = data.video_times[:, 0]
    assert bool(((offsets >= 0) & (offsets < 1 / 30)).all()) and offsets.unique().numel() == 8


def test_event_times_respect_separation_and_margins():
    times = event_times(500, TASK, torch.Generator().manual_seed(0))
    assert times.shape == (500, TASK.n_events)
    assert bool((times.diff(dim=1) >= TASK.min_separation_s).all())
    assert bool((times >= TASK.margin_s).all()) and bool((times <= TASK.duration_s - TASK.margin_s).all())


def test_label_is_whether_the_streams_share_event_times():
    data = generate(200, TASK, seed=1)
    same = (data.audio_event_times == data.video_event_times).all(dim=1)
    assert torch.equal(same, data.labels == 1)


def test_each_stream_alone_has_the_same_distribution_in_both_classes():
    # The video events of class 0 are an independent draw of the same process as the
    # audio events, so per-stream statistics cannot tell the classes apart.
    data = generate(6000, TASK, seed=2)
    sync, indep = data.labels == 1, data.labels == 0
    for events in (data.audio_event_times, data.video_event_times):
        for stat in (lambda e: e.mean(dim=1), lambda e: e[:, 0], lambda e: e.diff(dim=1).mean(dim=1)):
            s = stat(events)
            se = (s[sync].var() / sync.sum() + s[indep].var() / indep.sum()).sqrt()
            assert abs(float(s[sync].mean() - s[indep].mean())) < 4 * float(se)
    # Frames that carry an event, per clip: the same in both classes (counts carry no label).
    for times, events, half in (
        (data.audio_times, data.audio_event_times, TASK.audio_event_half_s),
        (data.video_times, data.video_event_times, TASK.video_event_half_s),
    ):
        count = ((times[:, :, None] - events[:, None, :]).abs() <= half).any(dim=-1).sum(dim=1).float()
        assert count.min() >= TASK.n_events
        se = (count[sync].var() / sync.sum() + count[indep].var() / indep.sum()).sqrt()
        assert abs(float(count[sync].mean() - count[indep].mean())) <= 4 * float(se)


def test_training_batches_are_fresh_and_shared_across_variants():
    assert training_seed(0, 5) == training_seed(0, 5)
    seeds = {training_seed(s, step) for s in range(3) for step in range(2000)}
    assert len(seeds) == 3 * 2000


def test_event_that_cannot_fit_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        event_times(1, TaskConfig(n_events=10, min_separation_s=0.3), torch.Generator())
