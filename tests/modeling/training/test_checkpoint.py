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
