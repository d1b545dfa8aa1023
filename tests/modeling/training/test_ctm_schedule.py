"""The CTM weight's schedule (TrainConfig.ctm_schedule): the pure function, the config, the run key,
and that train_model trains with the weight the function gives at each global step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from training_fixtures import build_tiny_store, tiny_loaders, tiny_meta

from modeling.network.encoder import MsataConfig, MsataModel
from modeling.network.losses import CTM_SCHEDULES, ctm_weight
from modeling.training import train_loop
from modeling.training.experiment_spec import ExperimentSpec
from modeling.training.train_loop import TrainConfig, train_model

FIXTURES = Path(__file__).parent / "fixtures"
V1 = json.loads((FIXTURES / "experiment_v1.json").read_text())
V1_KEY = (FIXTURES / "experiment_v1.key").read_text().strip()


def test_constant_is_lambda_at_every_step() -> None:
    assert [ctm_weight(0.1, "constant", s, 600) for s in (0, 1, 300, 599, 600, 10_000)] == [0.1] * 6
    assert ctm_weight(0.0, "constant", 5, 10) == 0.0


def test_cosine_starts_at_lambda_halves_at_the_middle_and_ends_at_zero() -> None:
    assert ctm_weight(0.1, "cosine", 0, 600) == pytest.approx(0.1)
    assert ctm_weight(0.1, "cosine", 150, 600) == pytest.approx(0.1 * (1 + math.sqrt(0.5)) / 2)
    assert ctm_weight(0.1, "cosine", 300, 600) == pytest.approx(0.05)
    assert ctm_weight(0.1, "cosine", 450, 600) == pytest.approx(0.1 * (1 - math.sqrt(0.5)) / 2)
    assert ctm_weight(0.1, "cosine", 600, 600) == pytest.approx(0.0, abs=1e-12)
    assert ctm_weight(0.1, "cosine", 900, 600) == pytest.approx(0.0, abs=1e-12)  # past the horizon: stays 0
    weights = [ctm_weight(0.1, "cosine", s, 600) for s in range(600)]
    assert all(a > b for a, b in zip(weights, weights[1:], strict=False))  # strictly decreasing, still > 0 at the last step
    assert weights[-1] > 0


def test_bad_schedule_or_horizon_is_rejected_naming_the_value() -> None:
    with pytest.raises(ValueError, match="'linear'"):
        ctm_weight(0.1, "linear", 0, 10)
    with pytest.raises(ValueError, match="total_steps=0"):
        ctm_weight(0.1, "cosine", 0, 0)
    with pytest.raises(ValueError, match="step=-1"):
        ctm_weight(0.1, "cosine", -1, 10)


def test_train_config_round_trip_and_rejects_an_unknown_schedule() -> None:
    assert TrainConfig().ctm_schedule == "cosine"  # the default since the synthetic-task runs (docs/benchmarks.md)
    cfg = TrainConfig(ctm_schedule="cosine", lambda_ctm=0.2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["ctm_schedule"] == "cosine"
    with pytest.raises(ValueError, match="ctm_schedule='cosin'"):
        TrainConfig(ctm_schedule="cosin")
    with pytest.raises(ValueError, match="ctm_schedule='step'"):
        TrainConfig.from_dict({"ctm_schedule": "step"})


def test_run_key_of_older_specs_is_kept_and_a_schedule_changes_it() -> None:
    spec = ExperimentSpec.from_dict(V1)  # written before ctm_schedule existed: loads as "constant"
    assert spec.train.ctm_schedule == "constant" and spec.run_key() == V1_KEY
    constant = ExperimentSpec.from_dict(V1 | {"train": V1["train"] | {"ctm_schedule": "constant"}})
    cosine = ExperimentSpec.from_dict(V1 | {"train": V1["train"] | {"ctm_schedule": "cosine"}})
    assert constant.run_key() == V1_KEY and cosine.run_key() != V1_KEY


def test_an_older_spec_loads_with_what_it_trained_with_not_todays_default(monkeypatch) -> None:
    """A spec without ctm_schedule trained with a constant weight; it must load so even if the default changes."""
    from modeling.training import experiment_spec

    monkeypatch.setattr(experiment_spec, "LATER_TRAIN_DEFAULTS", {"refit": False, "ctm_schedule": "cosine"})
    assert "ctm_schedule" not in V1["train"]
    assert ExperimentSpec.from_dict(V1).train.ctm_schedule == "cosine"  # filled from LATER_TRAIN_DEFAULTS, not TrainConfig
    written = V1 | {"train": V1["train"] | {"ctm_schedule": "constant"}}
    assert ExperimentSpec.from_dict(written).train.ctm_schedule == "constant"  # a recorded value wins


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("store") / "tiny"
    build_tiny_store(path, n_speakers=6, clips_per_speaker=4)
    return str(path)


def _spy_weights(monkeypatch) -> list[float]:
    """Record the CTM weight train_model hands the objective at every step."""
    seen: list[float] = []
    real = train_loop._objective

    def spy(model, output, labels, lambda_ctm, mixup=None):
        seen.append(lambda_ctm)
        return real(model, output, labels, lambda_ctm, mixup)

    monkeypatch.setattr(train_loop, "_objective", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("schedule", CTM_SCHEDULES)
def test_train_model_trains_with_the_scheduled_weight(schedule: str, store_path: str, tmp_path, monkeypatch) -> None:
    seen = _spy_weights(monkeypatch)
    train, val = tiny_loaders(store_path)
    epochs, n_steps = 3, len(train)
    cfg = TrainConfig(
        epochs=epochs, patience=10, batch_size=4, lr=3e-3, warmup_epochs=0.5, weight_decay=0.0, num_workers=0,
        max_duration_s=1.5, lambda_ctm=0.1, ctm_schedule=schedule,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MsataModel(MsataConfig.from_dict(tiny_meta()["model_config"]))
    result = train_model(model, train, val, cfg, tmp_path, tiny_meta())
    expected = [ctm_weight(0.1, schedule, g, epochs * n_steps) for g in range(epochs * n_steps)]
    assert seen == pytest.approx(expected)  # the weight of each global step, over the whole run's horizon
    per_epoch = [sum(expected[e * n_steps : (e + 1) * n_steps]) / n_steps for e in range(epochs)]
    assert [r.ctm_weight for r in result.history] == pytest.approx(per_epoch)
    assert all(r.train_ctm > 0 for r in result.history)  # CTM is computed while its weight is above 0
    if schedule == "cosine":
        assert seen[0] == pytest.approx(0.1) and seen[-1] < 0.01 and per_epoch[0] > per_epoch[1] > per_epoch[2]
    else:
        assert set(seen) == {0.1}
