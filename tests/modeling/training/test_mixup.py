"""Mixup on a training batch (modeling/training/mixup.py) and its loss and draws in the train loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from training_fixtures import build_tiny_store, tiny_loaders, tiny_meta, tiny_model

from modeling.network.batch import Batch, ClipExample, collate
from modeling.training import train_loop
from modeling.training.checkpoint import load_checkpoint
from modeling.training.mixup import draw_mixup, mix_batch
from modeling.training.train_loop import TrainConfig, _objective, train_model

FAST = dict(batch_size=4, lr=3e-3, warmup_epochs=0.5, weight_decay=0.0, num_workers=0, max_duration_s=1.5, patience=10)
SWAP = torch.tensor([1, 0])


def example(n_audio: int, n_video: int, label: int, value: float, clip_id: str) -> ClipExample:
    face = torch.ones(n_video, dtype=torch.bool)
    if n_video:
        face[0] = False  # a frame without a face: its pixels must not leak into the mix
    return ClipExample(
        audio=torch.full((n_audio, 3, 2), value, dtype=torch.float16),  # (Ta, L, D) encoder states
        audio_times=torch.arange(n_audio, dtype=torch.float32) * 0.02 + value,
        video=torch.full((n_video, 4, 4, 3), int(value * 100), dtype=torch.uint8),
        video_times=torch.arange(n_video, dtype=torch.float32) / 30,
        face_mask=face,
        label=label,
        clip_id=clip_id,
    )


def two_clips() -> Batch:
    return collate([example(5, 3, 0, 1.0, "long"), example(2, 2, 1, 2.0, "short")])


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("store") / "tiny"
    build_tiny_store(path, n_speakers=6, clips_per_speaker=4)
    return str(path)


def test_lam_one_keeps_each_clip_and_lam_zero_gives_its_partner() -> None:
    batch = two_clips()
    same = mix_batch(batch, 1.0, SWAP)
    for name in ("audio", "audio_times", "audio_mask", "video_times", "video_mask"):
        assert torch.equal(getattr(same, name), getattr(batch, name)), name
    other = mix_batch(batch, 0.0, SWAP)
    assert torch.equal(other.audio[1], batch.audio[0]) and torch.equal(other.audio_mask[1], batch.audio_mask[0])
    assert other.labels.tolist() == batch.labels.tolist() and other.clip_ids == batch.clip_ids  # labels stay the clip's own


def test_each_mixed_clip_keeps_its_dominant_clips_frames_masks_and_times() -> None:
    batch = two_clips()
    mixed = mix_batch(batch, 0.25, SWAP)  # each row is 75 % its partner: the partner's frames, mask and times
    assert mixed.audio_mask.tolist() == [batch.audio_mask[1].tolist(), batch.audio_mask[0].tolist()]
    assert torch.equal(mixed.audio_times[1], batch.audio_times[0]) and torch.equal(mixed.audio_times[0], batch.audio_times[1])
    # the short clip's row: frames 2-4 exist only in the long (dominant) clip, where they enter at its weight
    assert torch.allclose(mixed.audio[1, 3].float(), torch.full((3, 2), 0.75 * 1.0))
    assert torch.allclose(mixed.audio[1, 0].float(), torch.full((3, 2), 0.25 * 2.0 + 0.75 * 1.0))
    # the long clip's row takes the short clip's length: its frames 2-4 are dropped, not kept at 25 %
    assert float(mixed.audio[0, 2:].float().abs().max()) == 0.0
    assert mixed.audio_mask[0].tolist() == [True, True, False, False, False]
    assert mixed.audio.dtype == torch.float16


def test_frames_without_a_face_count_as_zeros_and_crops_stay_uint8() -> None:
    batch = two_clips()
    mixed = mix_batch(batch, 0.5, SWAP)  # a tie: each row keeps its own frames
    assert mixed.video.dtype == torch.uint8
    # frame 0 has no face in either clip: nothing of either crop, and it stays invalid
    assert int(mixed.video[0, 0].max()) == 0 and not bool(mixed.video_mask[0, 0])
    assert int(mixed.video[0, 1, 0, 0, 0]) == round(0.5 * 100 + 0.5 * 200)
    assert int(mixed.video[0, 2, 0, 0, 0]) == 50  # the partner has no frame 2: half the long clip's value


def test_an_absent_stream_stays_empty() -> None:
    batch = collate([example(4, 0, 0, 1.0, "a"), example(3, 0, 1, 2.0, "b")])
    mixed = mix_batch(batch, 0.3, SWAP)
    assert mixed.video.shape == batch.video.shape and mixed.video.shape[1] == 0


def test_bad_weights_and_partners_are_refused() -> None:
    batch = two_clips()
    with pytest.raises(ValueError, match="lam=1.5"):
        mix_batch(batch, 1.5, SWAP)
    with pytest.raises(ValueError, match="partner of shape"):
        mix_batch(batch, 0.5, torch.tensor([0, 1, 2]))
    for bad in (0.0, math.nan):
        with pytest.raises(ValueError, match="mixup_alpha="):
            draw_mixup(4, bad, seed=0, epoch=1, step=1)
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="mixup_alpha"):
            TrainConfig(mixup_alpha=bad)


def test_draws_are_keyed_by_seed_epoch_step_and_rank() -> None:
    first = draw_mixup(8, 0.4, seed=0, epoch=2, step=3)
    again = draw_mixup(8, 0.4, seed=0, epoch=2, step=3)
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    assert 0.0 <= first[0] <= 1.0 and sorted(first[1].tolist()) == list(range(8))
    other_rank = draw_mixup(5, 0.4, seed=0, epoch=2, step=3, rank=1)
    assert other_rank[0] == first[0]  # one weight per global batch, whatever share a rank holds
    assert draw_mixup(8, 0.4, seed=0, epoch=2, step=4)[0] != first[0]
    assert draw_mixup(8, 0.4, seed=1, epoch=2, step=3)[0] != first[0]


def test_a_clip_mixed_at_weight_one_is_unchanged_for_the_model(store_path: str) -> None:
    """The encoder-state front-end normalises each frame, so any frame the partner left in would reach it at full strength."""
    model = tiny_model().eval()
    batch = next(iter(tiny_loaders(store_path)[0]))
    partner = torch.arange(len(batch)).flip(0)
    with torch.no_grad():
        assert torch.allclose(model(mix_batch(batch, 1.0, partner)).logits, model(batch).logits, atol=1e-6)
        assert not torch.allclose(model(mix_batch(batch, 0.6, partner)).logits, model(batch).logits, atol=1e-3)


def test_objective_weighs_both_labels_and_counts_ctm_once(store_path: str) -> None:
    model = tiny_model()
    batch = next(iter(tiny_loaders(store_path)[0]))
    output = model(batch)
    labels, n = batch.labels, len(batch)
    partner = torch.arange(n).roll(1)
    total, ce, ctm = _objective(model, output, labels, 0.5, (0.3, partner))
    expected_ce = 0.3 * F.cross_entropy(output.logits, labels) + 0.7 * F.cross_entropy(output.logits, labels[partner])
    assert ce == pytest.approx(float(expected_ce.detach()), rel=1e-5) and ctm > 0  # the tiny clips have audio and faces
    assert float(total) == pytest.approx(float(expected_ce.detach()) + 0.5 * ctm, rel=1e-5)
    plain_total, _, plain_ctm = _objective(model, output, labels, 0.5)
    same_total, _, _ = _objective(model, output, labels, 0.5, (0.3, torch.arange(n)))  # mixed with itself
    assert plain_ctm == ctm and float(same_total) == pytest.approx(float(plain_total), rel=1e-6)


@pytest.mark.slow
def test_every_step_mixes_and_weighs_with_the_same_draw(store_path: str, tmp_path, monkeypatch) -> None:
    mixed, weighed = [], []

    def spy_mix(batch, lam, partner):
        mixed.append((lam, partner.tolist()))
        return mix_batch(batch, lam, partner)

    def spy_objective(model, output, labels, lambda_ctm, mixup=None):
        weighed.append(None if mixup is None else (mixup[0], mixup[1].tolist()))
        return _objective(model, output, labels, lambda_ctm, mixup)

    monkeypatch.setattr(train_loop, "mix_batch", spy_mix)
    monkeypatch.setattr(train_loop, "_objective", spy_objective)
    train, val = tiny_loaders(store_path)
    train_model(tiny_model(), train, val, TrainConfig(epochs=2, mixup_alpha=0.4, **FAST), tmp_path / "on", tiny_meta())
    assert len(mixed) == 2 * len(train) and weighed == mixed
    assert len({lam for lam, _ in mixed}) > 1  # a new weight every step
    mixed.clear(), weighed.clear()
    train_model(tiny_model(), train, val, TrainConfig(epochs=1, **FAST), tmp_path / "off", tiny_meta())
    assert mixed == [] and weighed == [None] * len(train)


class Stop(Exception):
    """Raised from the progress callback after an epoch's checkpoint: a kill at that point."""


@pytest.mark.slow
def test_a_killed_run_with_mixup_resumes_like_an_uninterrupted_one(store_path: str, tmp_path) -> None:
    train, val = tiny_loaders(store_path)
    cfg = TrainConfig(epochs=3, mixup_alpha=0.4, **FAST)
    full = train_model(tiny_model(), train, val, cfg, tmp_path / "full", tiny_meta())

    def stop_after_first(event) -> None:
        if event.kind == "epoch_end" and event.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_model(tiny_model(), train, val, cfg, tmp_path / "killed", tiny_meta(), progress=stop_after_first)
    resumed = train_model(tiny_model(), train, val, cfg, tmp_path / "killed", tiny_meta(), resume=True)
    assert [r.train_loss for r in resumed.history] == pytest.approx([r.train_loss for r in full.history], rel=1e-6)
    want, got = load_checkpoint(full.last_path)["state_dict"], load_checkpoint(resumed.last_path)["state_dict"]
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
