"""The pooled-statistics probe (train.probe_weight): its maths, its mixing and its checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling.network.pooled_probe import CHECKPOINT_KEY, PooledProbe, mix_log_probs, pooled_statistics


def test_pooled_statistics_are_mean_and_std_over_valid_frames_only() -> None:
    rng = np.random.default_rng(0)
    states = rng.normal(size=(2, 7, 3, 4)).astype(np.float16)  # (B, T, L, D)
    mask = np.ones((2, 7), dtype=bool)
    mask[1, 5:] = False  # padding, which must not count
    states[1, 5:] = 1000.0
    got = pooled_statistics(torch.from_numpy(states), torch.from_numpy(mask)).numpy()
    for b, n in ((0, 7), (1, 5)):
        frames = states[b, :n].astype(np.float32).reshape(n, -1)  # layer-major, as bench/pooled_baselines.py's "all layers"
        np.testing.assert_allclose(got[b], np.concatenate([frames.mean(0), frames.std(0)]), rtol=1e-5, atol=1e-5)


def test_a_clip_without_a_valid_frame_gives_zeros() -> None:
    got = pooled_statistics(torch.ones(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(got, torch.zeros(1, 8))


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_mixing_is_the_log_of_the_weighted_mean_of_probabilities(weight: float) -> None:
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    expected = (1 - weight) * torch.softmax(a, -1) + weight * torch.softmax(b, -1)
    mixed = mix_log_probs(a, b, weight)
    torch.testing.assert_close(mixed.exp(), expected)
    torch.testing.assert_close(torch.softmax(mixed, -1), expected)  # what predict() and the cross-entropy see


@pytest.mark.parametrize("weight", [0.3, 0.5])
def test_geometric_mixing_is_the_normalised_weighted_product_of_probabilities(weight: float) -> None:
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    product = torch.softmax(a, -1) ** (1 - weight) * torch.softmax(b, -1) ** weight
    torch.testing.assert_close(torch.softmax(mix_log_probs(a, b, weight, "geometric"), -1), product / product.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="probe mix 'median'"):
        mix_log_probs(a, b, weight, "median")


def test_mixing_weight_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match=r"probe weight 1.5; expected a value in \[0, 1\]"):
        mix_log_probs(torch.zeros(1, 2), torch.zeros(1, 2), 1.5)


def _probe(n_features: int = 8, n_classes: int = 3, weight: float = 0.5) -> PooledProbe:
    g = torch.Generator().manual_seed(0)
    return PooledProbe(
        torch.randn(n_features, generator=g),
        torch.rand(n_features, generator=g) + 0.5,
        torch.randn(n_classes, n_features, generator=g),
        torch.randn(n_classes, generator=g),
        weight,
    )


def test_probe_logits_are_a_linear_map_of_standardised_statistics() -> None:
    probe = _probe()
    audio, mask = torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.bool)
    x = pooled_statistics(audio, mask)
    torch.testing.assert_close(probe(audio, mask), ((x - probe.center) / probe.scale) @ probe.coef.T + probe.intercept)
    with pytest.raises(ValueError, match="fitted on 8 statistics per clip; this input gives 10"):
        probe(torch.randn(2, 6, 5), mask)


def test_probe_round_trips_through_a_checkpoint_dict_and_is_not_in_a_state_dict() -> None:
    probe = _probe()
    again = PooledProbe.from_checkpoint(probe.to_checkpoint())
    assert again.weight == probe.weight and all(
        torch.equal(getattr(again, k), getattr(probe, k)) for k in ("center", "scale", "coef", "intercept")
    )
    assert probe.state_dict() == {}  # saved beside the model's state dict, under CHECKPOINT_KEY
    geometric = PooledProbe.from_checkpoint(
        PooledProbe(*(_probe().to_checkpoint()[k] for k in ("center", "scale", "coef", "intercept")), 0.5, "geometric").to_checkpoint()
    )
    assert geometric.mix_kind == "geometric"
    older = {k: v for k, v in probe.to_checkpoint().items() if k != "mix"}  # saved before train.probe_mix
    assert PooledProbe.from_checkpoint(older).mix_kind == "mean"
    with pytest.raises(ValueError, match=rf"its {CHECKPOINT_KEY} lacks \['coef'\]"):
        PooledProbe.from_checkpoint({k: v for k, v in probe.to_checkpoint().items() if k != "coef"})


def test_inconsistent_shapes_or_weight_are_refused() -> None:
    with pytest.raises(ValueError, match="shapes do not agree"):
        PooledProbe(torch.zeros(8), torch.ones(8), torch.zeros(3, 7), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match=r"weight 0.0; expected a value in \(0, 1\]"):
        _probe(weight=0.0)


def test_a_row_without_audio_keeps_the_models_own_probabilities() -> None:
    probe = _probe(n_features=8, n_classes=3, weight=0.5)
    logits, audio = torch.randn(2, 3), torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False  # a video-only clip, or a timeline window that holds faces but no audio frame
    mixed = probe.mix(logits, audio, mask)
    torch.testing.assert_close(mixed[1], torch.log_softmax(logits[1], -1))
    torch.testing.assert_close(mixed[0], mix_log_probs(logits[:1], probe(audio[:1], mask[:1]), 0.5)[0])
