"""bench/probe_variants.py's pure parts: temperature scaling and the combinations it scores."""

from __future__ import annotations

import numpy as np

from bench.probe_variants import combine, log_softmax, temperature


def test_temperature_undoes_an_overconfident_scale() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=4000)
    calibrated = rng.normal(size=(4000, 4))
    calibrated[np.arange(4000), y] += 1.0  # these logits are right on average
    # samples drawn from softmax(calibrated): then T = 1 is the best temperature, and T = 5 for logits five times as large
    probs = np.exp(log_softmax(calibrated))
    y = np.array([rng.choice(4, p=p) for p in probs])
    assert abs(temperature(calibrated, y) - 1.0) < 0.15
    assert abs(temperature(5.0 * calibrated, y) - 5.0) < 0.75


def test_the_combinations() -> None:
    model = np.log(np.array([[0.9, 0.1], [0.2, 0.8]]))
    probe = np.log(np.array([[0.3, 0.7], [0.6, 0.4]]))
    scores = combine(model, probe, (1.0, 1.0))
    np.testing.assert_allclose(scores["mean"], [[0.6, 0.4], [0.4, 0.6]])
    np.testing.assert_allclose(np.exp(scores["geometric"]), np.sqrt(np.exp(model) * np.exp(probe)))
    np.testing.assert_allclose(scores["calibrated mean"], scores["mean"])  # T = 1 changes nothing
    assert scores["model"].argmax(1).tolist() == [0, 1] and scores["probe"].argmax(1).tolist() == [1, 0]
