"""Atomic checkpoints: round trip, torn writes impossible, RNG capture."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling.training.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint


def payload(epoch: int) -> dict:
    return {
        "model_config": {"d": 4},
        "feature_config": {},
        "label_names": ["a", "b"],
        "state_dict": {"w": torch.full((2,), float(epoch))},
        "epoch": epoch,
    }


def test_round_trip(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "sub" / "last.pt", payload(3))
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["state_dict"]["w"], torch.full((2,), 3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp files left


def test_failed_write_keeps_previous_file(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", payload(1))
    broken = payload(2) | {"unpicklable": lambda: None}
    with pytest.raises(CheckpointError, match=r"payload\['unpicklable'\] is a function"):
        save_checkpoint(path, broken)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_missing_keys_and_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="label_names"):
        save_checkpoint(tmp_path / "x.pt", {"model_config": {}, "feature_config": {}, "state_dict": {}})
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    save_checkpoint(tmp_path / "inference_only.pt", payload(0))
    with pytest.raises(CheckpointError, match="optimizer"):
        load_checkpoint(tmp_path / "inference_only.pt", require_resume=True)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*garbage.pt"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_rng_states_restore_the_same_draws() -> None:
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


# ----------------------------------------------------------------------------- loading never runs code


class WritesMarker:
    """Unpickling this calls os.system: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_files(tmp_path: Path) -> dict[str, Path]:
    marker = tmp_path / "MARKER"
    evil = WritesMarker(marker)
    files = {
        "torch.save, bare": (lambda h: torch.save(evil, h)),
        "torch.save, valid-looking": (lambda h: torch.save(payload(1) | {"rng": evil}, h)),
        "torch.save, inside the state dict": (lambda h: torch.save(payload(1) | {"state_dict": {"w": evil}}, h)),
        "raw pickle, valid-looking": (lambda h: pickle.dump(payload(1) | {"epoch": evil}, h)),
    }
    out = {}
    for i, (name, write) in enumerate(files.items()):
        out[name] = tmp_path / f"crafted_{i}.pt"
        with out[name].open("wb") as handle:
            write(handle)
    # Sanity: the files really do run code when loaded the unsafe way.
    torch.load(out["torch.save, bare"], weights_only=False)
    assert marker.exists()
    marker.unlink()
    return out


def test_crafted_checkpoints_are_refused_without_running_code(tmp_path) -> None:
    from modeling.training.checkpoint import load_trained_model

    for name, path in crafted_files(tmp_path).items():
        for load in (load_checkpoint, load_trained_model):
            with pytest.raises(CheckpointError, match=f"(refusing to load|cannot read) checkpoint {path}") as info:
                load(path)
            assert "\n" not in str(info.value), name
        assert not (tmp_path / "MARKER").exists(), name


def test_a_training_payload_loads_with_weights_only(tmp_path) -> None:
    """What train_model writes (optimizer, scheduler, numpy RNG, numpy scalars) is plain data."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    np.random.seed(5)
    state = payload(1) | {
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best_metric": np.float64(0.25),
        "history": [{"epoch": 1, "val_uar": np.float32(0.5)}],
        "rng": capture_rng(),
        "train_config": {"lr": 1e-3, "modalities": ("audio", "video")},
    }
    path = save_checkpoint(tmp_path / "last.pt", state)
    raw = torch.load(path, weights_only=True)  # the strict loader, directly
    assert raw["best_metric"] == 0.25 and type(raw["best_metric"]) is float
    back = load_checkpoint(path, require_resume=False)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    expected = np.random.rand(3)
    np.random.seed(0)
    restore_rng(back["rng"])
    np.testing.assert_array_equal(np.random.rand(3), expected)


def test_a_trusted_legacy_checkpoint_can_be_upgraded(tmp_path) -> None:
    from modeling.training.checkpoint import upgrade_checkpoint

    legacy = tmp_path / "legacy.pt"
    torch.save(payload(2) | {"rng": {"numpy": np.random.get_state()}, "best_metric": np.float64(0.5)}, legacy)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint"):
        load_checkpoint(legacy)
    with pytest.raises(CheckpointError, match="trust"):
        upgrade_checkpoint(legacy, tmp_path / "new.pt", trust_source=False)
    new = upgrade_checkpoint(legacy, tmp_path / "new.pt", trust_source=True)
    assert load_checkpoint(new)["best_metric"] == 0.5


def test_training_and_inference_build_the_model_with_one_function(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_trained_model and Predictor.from_checkpoint both go through model_from_checkpoint:
    same weights, same outputs, same refusal of a label list that disagrees with the classifier."""
    from features.config import FeatureConfig
    from modeling.inference.predictor import Predictor
    from modeling.network.batch import ClipExample, collate
    from modeling.network.encoder import MsataConfig, MsataModel
    from modeling.training import checkpoint

    torch.manual_seed(0)
    config = MsataConfig(n_classes=2, n_mels=80, d_model=16, n_heads=2, n_layers=1, dropout=0.0, crop_size=16, video_channels=(4,))
    model = MsataModel(config).eval()
    state = {
        "model_config": config.to_dict(),
        "feature_config": FeatureConfig().to_dict(),
        "label_names": ["a", "b"],
        "state_dict": model.state_dict(),
    }
    path = save_checkpoint(tmp_path / "best.pt", state)
    built = []
    real = checkpoint.model_from_checkpoint
    monkeypatch.setattr(checkpoint, "model_from_checkpoint", lambda *a, **k: built.append(real(*a, **k)) or built[-1])

    trained, features, labels = checkpoint.load_trained_model(path)
    predictor = Predictor.from_checkpoint(load_checkpoint(path), device="cpu")
    assert built == [trained, predictor.model] and labels == predictor.label_names == ["a", "b"]
    assert features == predictor.feature_config and not trained.training and not predictor.model.training
    g = torch.Generator().manual_seed(1)
    example = ClipExample(
        audio=torch.randn(30, 80, generator=g),
        audio_times=torch.arange(30.0) / 50,
        video=torch.randint(0, 256, (9, 16, 16, 3), generator=g, dtype=torch.uint8),
        video_times=torch.arange(9.0) / 30,
        face_mask=torch.ones(9, dtype=torch.bool),
        label=0,
        clip_id="c",
    )
    with torch.no_grad():
        expected = model(collate([example])).logits
        torch.testing.assert_close(trained(collate([example])).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(predictor.model(collate([example])).logits, expected, rtol=0, atol=0)

    wrong = save_checkpoint(tmp_path / "wrong.pt", state | {"label_names": ["a", "b", "c"]})
    with pytest.raises(CheckpointError, match="3 label names for 2 classes"):
        checkpoint.load_trained_model(wrong)
    with pytest.raises(CheckpointError, match="3 label names for 2 classes"):
        Predictor.from_checkpoint(load_checkpoint(wrong), device="cpu")
