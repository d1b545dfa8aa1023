"""bench/ensemble_runs.py on recipes with a pooled probe: it scores the ensemble as `train.members` ships it.

(Recipes without a probe: tests/modeling/training/test_members.py, beside the members run it is checked against.)
"""

from __future__ import annotations

import json

import pytest
import torch
from training_fixtures import TINY_MODEL, build_tiny_store

from bench import ensemble_runs
from modeling.data.splits import SplitConfig
from modeling.network.pooled_probe import CHECKPOINT_KEY
from modeling.training.checkpoint import load_checkpoint, save_checkpoint
from modeling.training.fold_run import PROBED_FILE
from modeling.training.run_logger import NullRunLogger
from modeling.training.train_loop import TrainConfig

AUDIO_MODEL = TINY_MODEL | {"modalities": ["audio"]}


@pytest.mark.slow
def test_a_probed_ensemble_is_scored_as_the_members_run_ships_it(tmp_path, monkeypatch) -> None:
    """Given the standalone seed runs of a recipe with a geometric pooled probe, the bench's 2-member ensemble with
    member 0's probe validates and tests as the train.members = 2 run's fold (ensemble.pt + probe); without the probe,
    as that run's ensemble alone. Runs whose probes differ are refused."""
    from modeling.training.experiment import run_cross_validation

    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    base = {
        "epochs": 2, "patience": 5, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0.5, "num_workers": 0, "max_duration_s": 1.5,
        "probe_weight": 0.5, "probe_mix": "geometric",
    }  # fmt: skip

    def cv(name: str, **train):
        return run_cross_validation(
            str(tmp_path / "store"), "crema-d", TrainConfig(**base | train), SplitConfig(n_folds=2), AUDIO_MODEL,
            run_dir=tmp_path / name, logger=NullRunLogger(),
        )  # fmt: skip

    members = cv("members", members=2)
    cv("seed0"), cv("seed1", seed=1)
    bench = ensemble_runs.run([tmp_path / "seed0", tmp_path / "seed1"])
    assert bench["probe"] is True
    for fold, row in zip(members.folds, bench["folds"], strict=True):
        shipped = row["ensembles"][2]
        assert shipped["val_uar"] == pytest.approx(fold.shipped_val_uar)  # the ensemble with its probe
        assert shipped["test"] == pytest.approx(fold.test)
        assert shipped["alone"]["val_uar"] == pytest.approx(fold.members["val_uar_ensemble"])
        assert row["members"][0]["alone"]["test"] == pytest.approx(fold.members["test_first_member"])
    assert {"model 0, as shipped (with the probe)", "model 0 alone", "2 members, without the probe"} <= set(bench["summary"])
    partial = ensemble_runs.run([tmp_path / "seed0", tmp_path / "seed1"], only_folds=[1])  # a look at finished folds
    assert partial["only_folds"] == [1] and [r["fold"] for r in partial["folds"]] == [1]
    assert partial["folds"][0]["ensembles"] == bench["folds"][1]["ensembles"]
    parts = [partial, ensemble_runs.run([tmp_path / "seed0", tmp_path / "seed1"], only_folds=[0])]
    merged = ensemble_runs.merge([json.loads(json.dumps(p)) for p in parts])  # as read back from their --out files
    assert merged["summary"] == bench["summary"]  # folds scored as they finish sum up to the whole
    with pytest.raises(SystemExit, match=r"a fold is scored twice"):
        ensemble_runs.merge([partial, partial])
    with pytest.raises(SystemExit, match=r"--folds \[2\]: the runs have folds \[0, 1\]"):
        ensemble_runs.run([tmp_path / "seed0", tmp_path / "seed1"], only_folds=[2])

    probed = tmp_path / "seed1" / "fold_0" / PROBED_FILE
    payload = load_checkpoint(probed)
    payload[CHECKPOINT_KEY]["intercept"] = payload[CHECKPOINT_KEY]["intercept"] + torch.ones(1, dtype=torch.float64)
    save_checkpoint(probed, payload)
    with pytest.raises(SystemExit, match=r"seed1: fold 0's pooled probe differs from .*seed0's"):
        ensemble_runs.run([tmp_path / "seed0", tmp_path / "seed1"])
