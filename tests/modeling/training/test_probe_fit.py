"""Fitting the pooled probe (modeling/training/probe_fit.py) and carrying it in a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from modeling.network.pooled_probe import CHECKPOINT_KEY, pooled_statistics
from modeling.training.metrics import compute_metrics
from modeling.training.probe_fit import C_GRID, choose_probe, fit_logistic, pooled_features, probe_predictions


def _blobs(n: int, n_classes: int, n_features: int = 6, seed: int = 0, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(scale=spread, size=(n_classes, n_features))
    y = np.arange(n) % n_classes
    return centers[y] + rng.normal(size=(n, n_features)) * np.linspace(0.5, 5.0, n_features), y


def _probe_probs(probe, x: np.ndarray) -> np.ndarray:
    logits = ((torch.from_numpy(x).float() - probe.center) / probe.scale) @ probe.coef.T + probe.intercept
    return torch.softmax(logits, -1).numpy()


@pytest.mark.parametrize("n_classes", [2, 4])
def test_the_probe_computes_what_the_standardised_logistic_regression_predicts(n_classes: int) -> None:
    x, y = _blobs(80, n_classes)
    probe = fit_logistic(x, y, n_classes, c=0.1, weight=0.5, seed=0)
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(C=0.1, max_iter=2000, random_state=0).fit(scaler.transform(x), y)
    np.testing.assert_allclose(_probe_probs(probe, x), reference.predict_proba(scaler.transform(x)), atol=1e-4)


def test_a_class_the_training_clips_never_show_gets_no_probability() -> None:
    x, y = _blobs(60, 3)
    probe = fit_logistic(x, y, n_classes=5, c=1.0, weight=0.5, seed=0)  # classes 3 and 4 absent
    probs = _probe_probs(probe, x)
    assert probs.shape == (60, 5) and probs[:, 3:].max() < 1e-6
    with pytest.raises(ValueError, match="at least two classes among its 10 training clips"):
        fit_logistic(x[:10], np.zeros(10, dtype=int), 5, 1.0, 0.5, 0)


def test_c_is_chosen_on_validation_and_refitting_uses_the_refit_clips() -> None:
    train, val, extra = _blobs(60, 3, seed=1), _blobs(45, 3, seed=2), _blobs(30, 3, seed=3)
    choice = choose_probe(train, val, 3, weight=0.25, seed=0)
    by_c = {c: compute_metrics(val[1], probe_predictions(fit_logistic(*train, 3, c, 0.25, 0), val[0]), 3).uar for c in C_GRID}
    assert choice.val_uar == max(by_c.values()) and choice.c == next(c for c in C_GRID if by_c[c] == choice.val_uar)
    assert choice.n_train == 60 and choice.probe.weight == 0.25
    both = (np.concatenate([train[0], extra[0]]), np.concatenate([train[1], extra[1]]))
    refit = choose_probe(train, val, 3, weight=0.25, seed=0, refit_on=both)
    assert refit.c == choice.c and refit.val_uar == choice.val_uar and refit.n_train == 90
    assert not torch.equal(refit.probe.coef, choice.probe.coef)
    assert choice.record() == {"C": choice.c, "weight": 0.25, "mix": "mean", "probe_val_uar": choice.val_uar, "n_fit": 60}
    assert choose_probe(train, val, 3, weight=0.25, seed=0, mix="geometric").probe.mix_kind == "geometric"


def test_a_checkpoint_with_a_probe_builds_a_model_whose_output_is_the_mixture(tmp_path) -> None:
    from modeling.network.batch import Batch
    from modeling.network.encoder import MsataConfig, MsataModel
    from modeling.training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint

    config = MsataConfig(n_classes=3, n_mels=4, d_model=16, n_heads=2, n_layers=1, video_channels=(4,), crop_size=8, modalities=("audio",))
    model = MsataModel(config).eval()
    audio, mask = torch.randn(5, 9, 4), torch.ones(5, 9, dtype=torch.bool)
    mask[0, 6:] = False
    x = pooled_statistics(audio, mask).numpy()
    probe = fit_logistic(x, np.array([0, 1, 2, 0, 1]), 3, 1.0, 0.4, 0)
    payload = {"model_config": config.to_dict(), "feature_config": {}, "label_names": ["a", "b", "c"], "state_dict": model.state_dict()}
    save_checkpoint(tmp_path / "plain.pt", payload)
    save_checkpoint(tmp_path / "probed.pt", payload | {CHECKPOINT_KEY: probe.to_checkpoint()})
    batch = Batch(
        audio=audio, audio_times=torch.arange(9.0).expand(5, 9) * 0.01, audio_mask=mask, video=torch.zeros(5, 0, 8, 8, 3, dtype=torch.uint8),
        video_times=torch.zeros(5, 0), video_mask=torch.zeros(5, 0, dtype=torch.bool), labels=torch.zeros(5, dtype=torch.long),
        clip_ids=list("abcde"),
    )  # fmt: skip
    with torch.no_grad():
        plain = model_from_checkpoint(load_checkpoint(tmp_path / "plain.pt")).eval()(batch).logits
        probed = model_from_checkpoint(load_checkpoint(tmp_path / "probed.pt"))
        mixed = probed(batch).logits
    assert probed.pooled_probe is not None
    expected = 0.6 * torch.softmax(plain, -1) + 0.4 * torch.from_numpy(_probe_probs(probe, x))
    torch.testing.assert_close(torch.softmax(mixed, -1), expected, atol=1e-5, rtol=1e-4)
    broken = load_checkpoint(tmp_path / "probed.pt")
    broken[CHECKPOINT_KEY]["coef"] = broken[CHECKPOINT_KEY]["coef"][:, :3]
    with pytest.raises(CheckpointError, match="shapes do not agree"):
        model_from_checkpoint(broken, source="broken.pt")


def test_clips_without_audio_are_left_out_of_the_probes_clips() -> None:
    from modeling.network.batch import Batch

    def batch(mask: torch.Tensor, labels: list[int]) -> Batch:
        b, t = mask.shape
        return Batch(
            audio=torch.randn(b, t, 3), audio_times=torch.zeros(b, t), audio_mask=mask, video=torch.zeros(b, 0, 52),
            video_times=torch.zeros(b, 0), video_mask=torch.zeros(b, 0, dtype=torch.bool), labels=torch.tensor(labels),
            clip_ids=[str(i) for i in range(b)],
        )  # fmt: skip

    with_audio, without = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    x, y = pooled_features([batch(torch.stack([with_audio, without]), [0, 1]), batch(torch.stack([with_audio]), [2])])
    assert x.shape == (2, 6) and y.tolist() == [0, 2]
    with pytest.raises(ValueError, match="no clip of the loader holds audio"):
        pooled_features([batch(torch.stack([without]), [1])])
