"""bench/nested_refit.py's inner folds and bench/refit_arms.py's two arms of a refit run (session 18's nested check)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from training_fixtures import TINY_MODEL, build_tiny_store

from bench import refit_arms
from bench.nested_refit import inner_folds, main
from modeling.data import splits as sp
from modeling.training.run_logger import NullRunLogger
from modeling.training.train_loop import TrainConfig

AUDIO_MODEL = TINY_MODEL | {"modalities": ["audio"]}


def _manifest(n_speakers: int, clips: int = 3) -> pd.DataFrame:
    rows = [{"clip_id": f"s{s:02d}_c{c}", "speaker": f"{s:02d}", "label": "happy"} for s in range(n_speakers) for c in range(clips)]
    return pd.DataFrame(rows)


def test_inner_folds_hold_out_the_outer_validation_speakers_and_never_touch_the_outer_test() -> None:
    manifest, config = _manifest(20), sp.SplitConfig(n_folds=5, val_fraction=0.2)
    outer = sp.make_folds(manifest, config)
    inner = inner_folds(outer, manifest, config)
    assert [f.index for f in inner] == [f.index for f in outer]
    for o, i in zip(outer, inner, strict=True):
        assert i.test_speakers == o.val_speakers  # the outer validation speakers are the held-out ones
        assert set(i.train_speakers) | set(i.val_speakers) == set(o.train_speakers)
        assert not set(i.train_speakers) & set(i.val_speakers)
        assert len(i.val_speakers) == 3 and len(i.train_speakers) == 10  # round(0.2 * 13) drawn from 13
        assert not set(i.train_ids + i.val_ids + i.test_ids) & set(o.test_ids)  # the outer test is in no part
    assert inner == inner_folds(outer, manifest, config)  # the same draw every time (a resumed run checks the splits)


def test_the_nested_run_never_registers(monkeypatch) -> None:
    original = sp.make_folds
    monkeypatch.setattr("sys.argv", ["nested_refit.py", "--store", "S", "--dataset", "ravdess", "--register"])
    with pytest.raises(SystemExit, match="--register is refused"):
        main()
    assert sp.make_folds is original  # refused before the folds were replaced


@pytest.mark.slow
def test_the_pre_refit_arm_as_shipped_is_the_same_recipe_run_without_refit(tmp_path, monkeypatch) -> None:
    """The bench's pre-refit arm (the model chosen on validation with a probe fitted on the training speakers) tests
    exactly as a run of the same recipe without train.refit ships; its refit arm as the refit run records."""
    from modeling.training.experiment import run_cross_validation

    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    build_tiny_store(tmp_path / "store", n_speakers=6, clips_per_speaker=4)
    base = {
        "epochs": 2, "patience": 5, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0.5, "num_workers": 0, "max_duration_s": 1.5,
        "probe_weight": 0.5, "probe_mix": "geometric",
    }  # fmt: skip

    def cv(name: str, **train):
        return run_cross_validation(
            str(tmp_path / "store"), "crema-d", TrainConfig(**base | train), sp.SplitConfig(n_folds=2), AUDIO_MODEL,
            run_dir=tmp_path / name, logger=NullRunLogger(),
        )  # fmt: skip

    refit, plain = cv("refit", refit=True), cv("plain")
    bench = refit_arms.run(tmp_path / "refit")
    for fold_refit, fold_plain, row in zip(refit.folds, plain.folds, bench["folds"], strict=True):
        assert row["pre-refit as shipped"] == pytest.approx(fold_plain.test)
        assert row["pre-refit model"] == pytest.approx(fold_refit.selection_test)
        assert row["refit as shipped"] == pytest.approx(fold_refit.test)
    gains = [r["refit as shipped"]["uar"] - r["pre-refit as shipped"]["uar"] for r in bench["folds"]]
    assert bench["refit_gain_uar"]["per_fold"] == pytest.approx(gains)

    with pytest.raises(SystemExit, match=r"train.refit runs"):
        refit_arms.run(tmp_path / "plain")
    result_file = tmp_path / "refit" / "fold_1" / "result.json"
    recorded = json.loads(result_file.read_text())
    recorded["selection_test"]["uar"] += 0.5  # a record the bench does not reproduce stops it
    result_file.write_text(json.dumps(recorded))
    with pytest.raises(SystemExit, match=r"fold 1's pre-refit model's test UAR is"):
        refit_arms.run(tmp_path / "refit")
