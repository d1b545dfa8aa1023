"""Mixup on a training batch (modeling/training/mixup.py) and its loss in the train loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from training_fixtures import build_tiny_store, tiny_loaders, tiny_meta

from modeling.network.batch import Batch, ClipExample, collate
from modeling.network.encoder import MsataConfig, MsataModel
from modeling.training.mixup import draw_mixup, mix_batch
from modeling.training.train_loop import TrainConfig, _objective, train_model


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


SWAP = torch.tensor([1, 0])


def test_lam_one_keeps_each_clip_and_lam_zero_gives_its_partner() -> None:
    batch = two_clips()
    same = mix_batch(batch, 1.0, SWAP)
    assert torch.equal(same.audio[0], batch.audio[0]) and torch.equal(same.audio[1], batch.audio[1])
    other = mix_batch(batch, 0.0, SWAP)
    assert torch.equal(other.audio[1], batch.audio[0])  # the short clip becomes the long one, every frame
    assert other.labels.tolist() == batch.labels.tolist() and other.clip_ids == batch.clip_ids  # labels stay the clip's own


def test_masks_are_the_union_and_times_come_from_whoever_has_the_frame() -> None:
    batch = two_clips()
    mixed = mix_batch(batch, 0.25, SWAP)
    assert mixed.audio_mask.tolist() == [[True] * 5, [True] * 5]
    # frames 2-4 exist only in the long clip: there the short clip's row is 0.75 * the long one's and takes its times
    assert torch.allclose(mixed.audio[1, 3].float(), torch.full((3, 2), 0.75 * 1.0))
    assert torch.allclose(mixed.audio[1, 0].float(), torch.full((3, 2), 0.25 * 2.0 + 0.75 * 1.0))
    assert torch.equal(mixed.audio_times[1, 2:], batch.audio_times[0, 2:])
    assert torch.equal(mixed.audio_times[1, :2], batch.audio_times[1, :2])
    assert mixed.audio.dtype == torch.float16


def test_frames_without_a_face_count_as_zeros_and_crops_stay_uint8() -> None:
    batch = two_clips()
    mixed = mix_batch(batch, 0.5, SWAP)
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
    with pytest.raises(ValueError, match="mixup_alpha=0"):
        draw_mixup(4, 0.0)
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="mixup_alpha"):
            TrainConfig(mixup_alpha=bad)


def test_draws_follow_the_seed() -> None:
    torch.manual_seed(3)
    first = draw_mixup(8, 0.4)
    torch.manual_seed(3)
    again = draw_mixup(8, 0.4)
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    assert 0.0 <= first[0] <= 1.0 and sorted(first[1].tolist()) == list(range(8))


def test_objective_weighs_both_labels() -> None:
    torch.manual_seed(0)
    model = MsataModel(MsataConfig.from_dict(tiny_meta()["model_config"]))
    n = len(tiny_meta()["label_names"])

    class Output:  # only logits are read with lambda_ctm = 0
        logits = torch.randn(4, n)

    labels, partner = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 0, 3, 1])
    total, ce, _ = _objective(model, Output, labels, 0.0, (0.3, partner))
    expected = 0.3 * F.cross_entropy(Output.logits, labels) + 0.7 * F.cross_entropy(Output.logits, labels[partner])
    assert float(total) == pytest.approx(float(expected), rel=1e-6) and ce == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.slow
def test_training_with_mixup_runs_and_differs_from_without(tmp_path) -> None:
    store = tmp_path / "tiny"
    build_tiny_store(store, n_speakers=6, clips_per_speaker=4)
    fast = dict(epochs=2, patience=5, batch_size=4, lr=3e-3, warmup_epochs=0.5, weight_decay=0.0, num_workers=0, max_duration_s=1.5)
    losses = {}
    for alpha in (0.0, 0.4):
        torch.manual_seed(0)
        model = MsataModel(MsataConfig.from_dict(tiny_meta()["model_config"]))
        train, val = tiny_loaders(store)
        result = train_model(model, train, val, TrainConfig(mixup_alpha=alpha, **fast), tmp_path / f"a{alpha}", tiny_meta())
        assert result.epochs_run == 2 and all(math.isfinite(r.train_loss) for r in result.history)
        losses[alpha] = [r.train_loss for r in result.history]
    assert losses[0.0] != losses[0.4]
