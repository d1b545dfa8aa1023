"""Seed ensembles (train.members): the checkpoint, the model, the fold, and what the bench assembles."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import TINY_MODEL, build_tiny_store

from modeling.data.splits import SplitConfig
from modeling.network.encoder import MsataConfig, MsataModel
from modeling.network.ensemble import MemberEnsemble, mean_probability_log
from modeling.training.checkpoint import (
    MEMBERS_KEY,
    CheckpointError,
    ensemble_payload,
    load_checkpoint,
    load_trained_model,
    save_checkpoint,
)
from modeling.training.run_logger import NullRunLogger
from modeling.training.train_loop import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[3]
AUDIO_MODEL = TINY_MODEL | {"modalities": ["audio"]}


def _payload(seed: int, **changes) -> dict:
    torch.manual_seed(seed)
    config = MsataConfig.from_dict(AUDIO_MODEL | {"n_classes": 3, "n_mels": 16})
    model = MsataModel(config)
    payload = {
        "model_config": config.to_dict(),
        "feature_config": {"audio": {"n_mels": 16}},
        "label_names": ["a", "b", "c"],
        "state_dict": model.state_dict(),
        "train_config": {"max_duration_s": 1.5},
        "epoch": 3,
        "optimizer": {},
        "history": [],
    }
    return payload | changes


def test_the_mean_probability_is_computed_in_log_space() -> None:
    logits = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, -1.0, 0.0]])]
    expected = (torch.softmax(logits[0], -1) + torch.softmax(logits[1], -1)) / 2
    assert torch.allclose(mean_probability_log(logits).exp(), expected)
    huge = [torch.tensor([[0.0, -1e4]]), torch.tensor([[-1e4, 0.0]])]  # no underflow to log(0)
    assert torch.allclose(mean_probability_log(huge), torch.full((1, 2), math.log(0.5)))


def test_an_ensemble_checkpoint_loads_as_the_mean_of_its_members(tmp_path) -> None:
    from modeling.network.batch import Batch

    payloads = [_payload(seed) for seed in (0, 1, 2)]
    path = save_checkpoint(tmp_path / "ensemble.pt", ensemble_payload(payloads))
    saved = load_checkpoint(path)
    assert len(saved[MEMBERS_KEY]) == 2 and "optimizer" not in saved and "epoch" not in saved and "history" not in saved
    assert saved["train_config"] == {"max_duration_s": 1.5}  # inference reads it (crop length, speaker normalisation)
    ensemble = load_trained_model(path)[0]
    assert isinstance(ensemble, MemberEnsemble) and len(ensemble.members) == 3 and not ensemble.training
    singles = []
    for p in payloads:
        model = MsataModel(MsataConfig.from_dict(p["model_config"]))
        model.load_state_dict(p["state_dict"])
        singles.append(model.eval())
    b, ta = 2, 40
    batch = Batch(
        audio=torch.randn(b, ta, 16),
        audio_times=torch.arange(ta).float().repeat(b, 1) * 0.02,
        audio_mask=torch.ones(b, ta, dtype=torch.bool),
        video=torch.zeros(b, 0, 16, 16, 3, dtype=torch.uint8),
        video_times=torch.zeros(b, 0),
        video_mask=torch.zeros(b, 0, dtype=torch.bool),
        labels=torch.zeros(b, dtype=torch.long),
        clip_ids=["x", "y"],
    )
    with torch.no_grad():
        mean = sum(torch.softmax(m(batch).logits, -1) for m in singles) / 3
        assert torch.allclose(torch.softmax(ensemble(batch).logits, -1), mean, atol=1e-6)


def test_members_of_another_recipe_or_store_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="at least two members"):
        ensemble_payload([_payload(0)])
    with pytest.raises(CheckpointError, match="member 1's label_names differs from member 0's"):
        ensemble_payload([_payload(0), _payload(1, label_names=["x", "y", "z"])])
    other = _payload(1, model_config=_payload(1)["model_config"] | {"d_model": 64})
    with pytest.raises(CheckpointError, match="member 1's model_config differs"):
        ensemble_payload([_payload(0), other])
    nested = ensemble_payload([_payload(0), _payload(1)])
    with pytest.raises(CheckpointError, match="member 1 is itself an ensemble"):
        ensemble_payload([_payload(0), nested])
    with pytest.raises(CheckpointError, match="member 0 is itself an ensemble"):
        ensemble_payload([nested, _payload(2)])
    with pytest.raises(CheckpointError, match="member 0 carries a pooled probe"):
        ensemble_payload([_payload(0, pooled_probe={"weight": 0.5}), _payload(1)])
    broken = ensemble_payload([_payload(0), _payload(1)])
    broken[MEMBERS_KEY][0] = {"classifier.weight": torch.zeros(2, 2)}
    path = save_checkpoint(tmp_path / "broken.pt", broken)
    with pytest.raises(CheckpointError, match=r"broken.pt: member 1's weights do not fit its model config"):
        load_trained_model(path)
    with pytest.raises(ValueError, match="at least two members"):
        MemberEnsemble([MsataModel(MsataConfig.from_dict(AUDIO_MODEL | {"n_classes": 3, "n_mels": 16}))])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"members": 0}, r"members=0; expected a whole number of models per fold"),
        ({"members": 2.5}, r"members=2.5; expected a whole number"),
        ({"members": True}, r"members=True; expected a whole number"),
        ({"members": 3, "refit": True}, r"members=3 with refit: a refit retrains one model"),
    ],
)
def test_bad_member_counts_are_refused(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


@pytest.mark.slow
def test_members_are_the_standalone_seed_runs_and_the_fold_ships_their_mean(tmp_path, monkeypatch, capsys) -> None:
    """A train.members = 2 run trains as member 1 what a standalone run with seed + 1 trains, weight for weight;
    the fold tests and ships the ensemble; bench/ensemble_runs.py, given the two standalone runs, scores the
    ensemble the members run shipped to the same figures."""
    from flows.cli_output import print_cv_result
    from modeling.training.experiment import run_cross_validation
    from modeling.training.members import ENSEMBLE_FILE, MEMBERS_DIR

    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    store = str(tmp_path / "store")
    base = {"epochs": 2, "patience": 5, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0.5, "num_workers": 0, "max_duration_s": 1.5}

    def cv(name: str, **train):
        config = TrainConfig(**base | train)
        return run_cross_validation(
            store, "crema-d", config, SplitConfig(n_folds=2), AUDIO_MODEL, run_dir=tmp_path / name, logger=NullRunLogger()
        )

    events: list = []
    members = run_cross_validation(
        store, "crema-d", TrainConfig(**base | {"members": 2}), SplitConfig(n_folds=2), AUDIO_MODEL,
        run_dir=tmp_path / "members", logger=NullRunLogger(), progress=events.append,
    )  # fmt: skip
    seed0, seed1 = cv("seed0"), cv("seed1", seed=1)
    for fold in members.folds:
        fold_dir = tmp_path / "members" / f"fold_{fold.index}"
        assert fold.best_path == str(fold_dir / ENSEMBLE_FILE)
        for member_dir, standalone in ((fold_dir, "seed0"), (fold_dir / MEMBERS_DIR / "1", "seed1")):
            for name in ("best.pt", "last.pt"):  # the chosen epoch's weights and the last epoch's
                mine = load_checkpoint(member_dir / name)["state_dict"]
                theirs = load_checkpoint(tmp_path / standalone / f"fold_{fold.index}" / name)["state_dict"]
                assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        record = fold.members
        assert record["seeds"] == [0, 1] and record["members"] == 2
        assert record["val_uar_members"] == [seed0.folds[fold.index].best_val_uar, seed1.folds[fold.index].best_val_uar]
        assert fold.shipped_val_uar == record["val_uar_ensemble"]
        assert record["test_first_member"] == seed0.folds[fold.index].test  # member 0 alone is the seed-0 run
    assert {"member 1"} <= {e.phase for e in events if e.kind == "epoch_end"}
    assert members.selected_fold == max(members.folds, key=lambda f: (f.members["val_uar_ensemble"], -f.index)).index
    saved = json.loads((tmp_path / "members" / "cv_result.json").read_text())
    assert saved["folds"][0]["members"] == members.folds[0].members
    print_cv_result(members)
    assert "2-member seed ensembles" in " ".join(capsys.readouterr().out.split())

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import cv_table
    import ensemble_runs

    markdown = cv_table.table(tmp_path / "members")
    assert (
        "Seed ensemble (`train.members`)" in markdown
        and f"| 0 | 0 1 | {' / '.join(map(str, members.folds[0].members['best_epochs']))} |" in markdown
    )

    bench = ensemble_runs.run([tmp_path / "seed0", tmp_path / "seed1"])
    for fold, row in zip(members.folds, bench["folds"], strict=True):
        assert row["ensembles"][2]["val_uar"] == pytest.approx(fold.members["val_uar_ensemble"])
        assert row["ensembles"][2]["test"] == pytest.approx(fold.test)
    (tmp_path / "seed1" / "fold_1" / "result.json").rename(tmp_path / "seed1-fold1-result.json")
    with pytest.raises(SystemExit, match=r"seed1: fold 1 has not finished \(result.json missing\)"):
        ensemble_runs.run([tmp_path / "seed0", tmp_path / "seed1"])  # a fold still training: its best.pt is not its model
    (tmp_path / "seed1-fold1-result.json").rename(tmp_path / "seed1" / "fold_1" / "result.json")
    with pytest.raises(
        SystemExit, match=r"seed0: its \[train\] is not .*seed1's with seed 2 \(its value, member 1's\): \{'seed': \(0, 2\)\}"
    ):
        ensemble_runs.run([tmp_path / "seed1", tmp_path / "seed0"])  # seeds in the wrong order are not members 0, 1


@pytest.mark.slow
def test_with_loader_workers_a_member_still_trains_what_its_standalone_run_trains(tmp_path, monkeypatch) -> None:
    """Persistent loader workers draw their base seed from the torch RNG once per loader: each member gets new
    loaders, as a standalone run does, or its dropout masks would differ from that run's."""
    from modeling.training.experiment import run_cross_validation
    from modeling.training.members import MEMBERS_DIR

    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    base = {"epochs": 2, "patience": 5, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0.5, "num_workers": 2, "max_duration_s": 1.5}
    model = AUDIO_MODEL | {"dropout": 0.3}  # dropout: what a skipped RNG draw would change
    splits = SplitConfig(n_folds=2)
    for name, train in (("members", {"members": 2}), ("seed1", {"seed": 1})):
        config = TrainConfig(**base | train)
        run_cross_validation(str(tmp_path / "store"), "crema-d", config, splits, model, run_dir=tmp_path / name, logger=NullRunLogger())
    for fold in (0, 1):  # last.pt: the weights after the last epoch (best.pt may be epoch 1's, before any skipped draw shows)
        mine = load_checkpoint(tmp_path / "members" / f"fold_{fold}" / MEMBERS_DIR / "1" / "last.pt")["state_dict"]
        theirs = load_checkpoint(tmp_path / "seed1" / f"fold_{fold}" / "last.pt")["state_dict"]
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.slow
def test_a_run_killed_during_a_member_resumes_that_member_where_it_stopped(tmp_path, monkeypatch) -> None:
    """A crash in member 1's second epoch, then --resume: member 0 is not retrained, member 1 goes on from its
    last.pt and ends with the weights of an uninterrupted standalone run with seed 1."""
    from modeling.training.experiment import run_cross_validation
    from modeling.training.members import MEMBERS_DIR

    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    store, splits = str(tmp_path / "store"), SplitConfig(n_folds=2)
    base = {"epochs": 3, "patience": 5, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0.5, "num_workers": 0, "max_duration_s": 1.5}
    model = AUDIO_MODEL | {"dropout": 0.3}

    def crash(event) -> None:
        if event.phase == "member 1" and event.kind == "epoch_end" and event.epoch == 2:
            raise KeyboardInterrupt("killed in member 1, epoch 2")

    members = TrainConfig(**base | {"members": 2})
    with pytest.raises(KeyboardInterrupt):
        run_cross_validation(store, "crema-d", members, splits, model, run_dir=tmp_path / "members", logger=NullRunLogger(), progress=crash)
    member_dir = tmp_path / "members" / "fold_0" / MEMBERS_DIR / "1"
    assert load_checkpoint(member_dir / "last.pt")["epoch"] == 2 and not (tmp_path / "members" / "fold_0" / "result.json").exists()
    events: list = []
    run_cross_validation(
        store, "crema-d", members, splits, model, run_dir=tmp_path / "members", resume=True, logger=NullRunLogger(), progress=events.append
    )
    trained = {(e.fold, e.phase, e.epoch) for e in events if e.kind == "epoch_end"}
    assert (0, "train", 1) not in trained and (0, "member 1", 3) in trained and (0, "member 1", 2) not in trained
    run_cross_validation(
        store, "crema-d", TrainConfig(**base | {"seed": 1}), splits, model, run_dir=tmp_path / "seed1", logger=NullRunLogger()
    )
    mine = load_checkpoint(member_dir / "last.pt")["state_dict"]
    theirs = load_checkpoint(tmp_path / "seed1" / "fold_0" / "last.pt")["state_dict"]
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
