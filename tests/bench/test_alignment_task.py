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


def _event_types(data, cfg: TaskConfig, pa: torch.Tensor, pv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each event's type: the pattern best correlated with the mean of the frames that carry the event."""
    near_a = ((data.audio_times[:, None, :] - data.audio_event_times[:, :, None]).abs() <= cfg.audio_event_half_s).float()
    near_v = ((data.video_times[:, None, :] - data.video_event_times[:, :, None]).abs() <= cfg.video_event_half_s).float()
    a = torch.einsum("nkt,ntf->nkf", near_a, data.audio)  # (N, K, F)
    v = torch.einsum("nkt,ntxyc->nkxyc", near_v, data.video.float() - 128)
    return (a @ pa.T).argmax(-1), torch.einsum("nkxyc,mxyc->nkm", v, pv).argmax(-1)


def test_correspondence_task_label_is_only_in_the_pairing():
    from bench.alignment_task import _type_patterns

    cfg = TaskConfig(kind="correspondence")
    data = generate(400, cfg, seed=5)
    assert torch.equal(data.audio_event_times, data.video_event_times)  # always synchronous
    a_types, v_types = _event_types(data, cfg, *_type_patterns(cfg))
    k = torch.arange(cfg.n_types)
    # every clip shows each type once in each stream: counts carry nothing
    assert torch.equal(a_types.sort(1).values, k.expand(400, -1)) and torch.equal(v_types.sort(1).values, k.expand(400, -1))
    matched = data.labels == 1
    assert bool((a_types[matched] == v_types[matched]).all())
    assert bool((a_types[~matched] != v_types[~matched]).all())  # a derangement: every pair wrong
    # single streams: the type at each event position is uniform in both classes
    for types in (a_types, v_types):
        for label in (0, 1):
            freq = torch.bincount(types[data.labels == label].flatten(), minlength=cfg.n_types).float()
            assert float(freq.min() / freq.max()) > 0.8
    with pytest.raises(ValueError, match="kind"):
        TaskConfig(kind="other")


def test_a_scheduled_variant_trains_with_the_training_paths_weight(monkeypatch):
    """fit_variant takes the CTM weight of each step from modeling.network.losses.ctm_weight."""
    import bench.alignment_task as at
    from modeling.network.losses import ctm_weight

    seen = []
    real = at.training_objective

    def spy(output, labels, lambda_ctm=0.0, **kwargs):
        seen.append(lambda_ctm)
        return real(output, labels, lambda_ctm=lambda_ctm, **kwargs)

    monkeypatch.setattr(at, "training_objective", spy)
    budget = at.TrainBudget(steps=6, batch_size=4, warmup_steps=2, d_model=8, n_heads=2, n_layers=1, video_channels=(4,), eval_every=0)
    test = generate(8, TASK, seed=20_000)
    for name in ("tarope+ctm-cosine", "tarope+ctm"):
        seen.clear()
        variant = at.VARIANTS[name]
        at.train_variant(variant, test, TASK, budget, seed=0)
        assert seen == pytest.approx([ctm_weight(0.1, variant.ctm_schedule, s, 6) for s in range(6)])
    assert seen == [0.1] * 6  # the constant form is unchanged


def test_seed_list_parsing():
    from bench.bench_alignment import parse_seeds

    assert parse_seeds("3,4,5") == [3, 4, 5]
    for bad in ("3,x", "3,3", "-1", ""):
        with pytest.raises(SystemExit, match="seed"):
            parse_seeds(bad)
