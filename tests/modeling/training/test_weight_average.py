"""The moving average of the weights (train.ema_decay): its arithmetic, and training with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from training_fixtures import build_tiny_store, tiny_loaders, tiny_meta

from modeling.network.encoder import MsataConfig, MsataModel
from modeling.training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from modeling.training.train_loop import TrainConfig, evaluate, train_model
from modeling.training.weight_average import WeightAverage

FAST = dict(batch_size=4, lr=3e-3, warmup_epochs=0.5, weight_decay=0.0, num_workers=0, max_duration_s=1.5, lambda_ctm=0.1)


def test_the_average_follows_the_formula_with_its_warm_up() -> None:
    layer = nn.Linear(2, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    average = WeightAverage(layer, decay=0.9)
    expected = torch.zeros(1, 2)
    for n, value in enumerate([1.0, 1.0, 4.0, 4.0, 4.0]):
        nn.init.constant_(layer.weight, value)
        d = min(0.9, (1 + n) / (10 + n))  # 0.1, 0.18, ... then capped at 0.9
        assert average.current_decay() == pytest.approx(d)
        average.update(layer)
        expected = d * expected + (1 - d) * value
    assert torch.allclose(average.shadow["weight"], expected)
    with average.swapped_in(layer) as raw:
        assert torch.allclose(layer.weight, expected) and torch.equal(raw["weight"], torch.full((1, 2), 4.0))
    assert torch.equal(layer.weight, torch.full((1, 2), 4.0))  # the raw weights are back
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="expected 0 < decay < 1"):
            WeightAverage(layer, bad)
    with pytest.raises(ValueError, match="ema_decay=1.5"):
        TrainConfig(ema_decay=1.5)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("store") / "tiny"
    build_tiny_store(path, n_speakers=6, clips_per_speaker=4)
    return str(path)


def _model() -> MsataModel:
    torch.manual_seed(0)
    return MsataModel(MsataConfig.from_dict(tiny_meta()["model_config"]))


class Stop(Exception):
    """Raised from the progress callback after an epoch's checkpoint: a kill at that point."""


def test_the_averaged_model_is_validated_shipped_and_resumes_like_an_uninterrupted_run(store_path: str, tmp_path) -> None:
    train, val = tiny_loaders(store_path)
    cfg = TrainConfig(epochs=3, patience=10, ema_decay=0.9, **FAST)
    full = train_model(_model(), train, val, cfg, tmp_path / "full", tiny_meta())
    last = load_checkpoint(full.last_path, require_resume=True)
    shipped, raw = last["state_dict"], last["raw_state_dict"]
    assert last["weight_average_updates"] == 3 * len(train)
    assert any(not torch.equal(shipped[k], raw[k]) for k in shipped)  # the average, not the last step's weights
    # What the fold's test and msata predict load (best.pt) is the averaged model that was validated:
    # its validation loss is the epoch's record (the raw weights' would differ).
    best = load_checkpoint(full.best_path, require_resume=True)
    assert "raw_state_dict" not in best  # the raw weights only resume, from last.pt
    n_classes = len(tiny_meta()["label_names"])
    _, loss = evaluate(model_from_checkpoint(best), val, torch.device("cpu"), n_classes)
    assert loss == pytest.approx(full.history[full.best_epoch - 1].val_loss, rel=1e-5)
    _, raw_loss = evaluate(model_from_checkpoint(last | {"state_dict": raw}), val, torch.device("cpu"), n_classes)
    assert raw_loss != pytest.approx(full.history[-1].val_loss, rel=1e-5)  # the check above can tell the two apart

    def stop_after_first(event) -> None:
        if event.kind == "epoch_end" and event.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_model(_model(), train, val, cfg, tmp_path / "killed", tiny_meta(), progress=stop_after_first)
    resumed = train_model(_model(), train, val, cfg, tmp_path / "killed", tiny_meta(), resume=True)
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    again = load_checkpoint(resumed.last_path, require_resume=True)
    for key in ("state_dict", "raw_state_dict"):
        for name, tensor in last[key].items():
            assert torch.allclose(again[key][name], tensor, atol=1e-6), (key, name)
    assert [r.val_uar for r in resumed.history] == [r.val_uar for r in full.history]
    # A run started without the average cannot be resumed with it (its checkpoint has no raw weights).
    plain = TrainConfig(epochs=1, patience=10, **FAST)
    train_model(_model(), train, val, plain, tmp_path / "plain", tiny_meta())
    with pytest.raises(CheckpointError, match="written without it"):
        train_model(
            _model(), train, val, TrainConfig(epochs=2, patience=10, ema_decay=0.9, **FAST), tmp_path / "plain", tiny_meta(), resume=True
        )
    # ... nor one started with it, without it (its state_dict is the average, not the optimiser's weights).
    with pytest.raises(CheckpointError, match="written with a weight average"):
        train_model(_model(), train, val, TrainConfig(epochs=4, patience=10, **FAST), tmp_path / "full", tiny_meta(), resume=True)
