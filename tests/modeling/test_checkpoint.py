"""Atomic checkpoints: round trip, torn writes impossible, RNG capture."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from modeling.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint


def payload(epoch: int) -> dict:
    return {"model_config": {"d": 4}, "feature_config": {}, "label_names": ["a", "b"], "state_dict": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}


def test_round_trip(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "sub" / "last.pt", payload(3))
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["state_dict"]["w"], torch.full((2,), 3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp files left


def test_failed_write_keeps_previous_file(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", payload(1))
    broken = payload(2) | {"unpicklable": lambda: None}
    with pytest.raises(Exception, match="pickle|lambda|local"):
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
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_rng_states_restore_the_same_draws() -> None:
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])
