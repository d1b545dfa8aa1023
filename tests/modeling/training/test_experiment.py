"""Pure parts of the cross-validation driver."""

from __future__ import annotations

import pandas as pd

from modeling.training.experiment import trained_modalities
from modeling.training.run_logger import NullRunLogger


def _manifest(has_audio: list[bool], has_video: list[bool], face_ratio: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"has_audio": has_audio, "has_video": has_video, "face_ratio": face_ratio})


def test_trained_modalities_follow_the_store():
    assert trained_modalities(_manifest([True, True], [False, False], [0.0, 0.0])) == ["audio"]  # RAVDESS speech
    assert trained_modalities(_manifest([True, False], [True, True], [0.9, 0.0])) == ["audio", "video"]
    assert trained_modalities(_manifest([False], [True], [0.5])) == ["video"]
    # Videos in which no face was ever found give the model no face tokens to learn from.
    assert trained_modalities(_manifest([True], [True], [0.0])) == ["audio"]


# ----------------------------------------------------------------------------- the run directory

import pytest  # noqa: E402
from training_fixtures import TINY_MODEL, build_tiny_store  # noqa: E402

from modeling.data.splits import SplitConfig  # noqa: E402
from modeling.training.train_loop import TrainConfig  # noqa: E402


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


@pytest.fixture()
def store(tmp_path):
    build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    return str(tmp_path / "store")


def _prepare(store, run_dir, resume=False):
    from modeling.training.experiment import prepare_experiment

    return prepare_experiment(
        store, "crema-d", TrainConfig(epochs=1), SplitConfig(n_folds=2), TINY_MODEL, run_dir=run_dir, resume=resume, logger=NullRunLogger()
    )


def test_a_foreign_folder_is_refused_and_left_alone(home, store, tmp_path):
    from modeling.training.experiment import RunDirError

    folder = tmp_path / "thesis"
    (folder / "chapters").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "chapters" / "one.tex").write_text("chapter one")
    for resume in (False, True):
        with pytest.raises(RunDirError, match=f"{folder}.*not an msata run directory") as info:
            _prepare(store, folder, resume)
        assert "\n" not in str(info.value)
        assert (folder / "thesis.tex").read_text() == "years of work" and (folder / "chapters" / "one.tex").read_text() == "chapter one"
    assert sorted(p.name for p in folder.iterdir()) == ["chapters", "thesis.tex"]  # nothing added either


def test_an_empty_folder_becomes_a_run_directory(home, store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (_prepare(store, empty) / "experiment.json").is_file()


def test_a_fresh_run_replaces_only_what_msata_wrote(home, store, tmp_path):
    run_dir = _prepare(store, tmp_path / "run")
    (run_dir / "fold_0").mkdir()
    (run_dir / "fold_0" / "last.pt").write_bytes(b"old checkpoint")
    (run_dir / "cv_result.json").write_text("{}")
    (run_dir / "notes.md").write_text("my notes")  # the user's, in msata's folder
    _prepare(store, run_dir)
    assert not (run_dir / "fold_0").exists() and not (run_dir / "cv_result.json").exists()
    assert (run_dir / "notes.md").read_text() == "my notes" and (run_dir / "experiment.json").is_file()


def test_experiment_json_is_written_first(home, store, tmp_path, monkeypatch):
    """A run killed while preparing leaves a folder that is recognisably msata's."""
    from modeling.data import splits

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(splits, "export_splits", killed)
    with pytest.raises(KeyboardInterrupt):
        _prepare(store, tmp_path / "run")
    monkeypatch.undo()
    assert (tmp_path / "run" / "experiment.json").is_file()
    assert (_prepare(store, tmp_path / "run", resume=True) / "splits.json").is_file()


# ----------------------------------------------------------------------------- MLflow runs end, models register once


def _statuses(run_dir):
    import json

    from mlflow import MlflowClient

    from modeling.tracking.runs import configure_tracking

    configure_tracking()
    client = MlflowClient()
    spec = json.loads((run_dir / "experiment.json").read_text())
    runs = {"parent": spec["mlflow"]["parent_run_id"]}
    for fold in (0, 1):
        path = run_dir / f"fold_{fold}" / "mlflow_run.json"
        if path.exists():
            runs[f"fold_{fold}"] = json.loads(path.read_text())["run_id"]
    return {name: client.get_run(run_id).info.status for name, run_id in runs.items()}


@pytest.mark.slow
def test_stopped_runs_are_marked_and_a_resumed_experiment_registers_once(home, store, tmp_path):
    from mlflow import MlflowClient

    from modeling.tracking.run_logger import MlflowRunLogger
    from modeling.training.experiment import run_cross_validation

    cfg = TrainConfig(epochs=1, batch_size=4, lr=3e-3, warmup_epochs=0.5, num_workers=0, max_duration_s=1.5)
    run_dir = tmp_path / "run"

    def stop_in_fold_1(error):
        def progress(event):
            if event.fold == 1 and event.kind == "step":
                raise error

        return progress

    def cv(progress=None, resume=True):
        return run_cross_validation(
            store,
            "crema-d",
            cfg,
            SplitConfig(n_folds=2),
            TINY_MODEL,
            run_dir=run_dir,
            resume=resume,
            progress=progress,
            logger=MlflowRunLogger(),
        )

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C
        cv(stop_in_fold_1(KeyboardInterrupt()), resume=False)
    assert _statuses(run_dir) == {"parent": "KILLED", "fold_0": "FINISHED", "fold_1": "KILLED"}
    with pytest.raises(RuntimeError, match="disk full"):  # a failure
        cv(stop_in_fold_1(RuntimeError("disk full")))
    assert _statuses(run_dir) == {"parent": "FAILED", "fold_0": "FINISHED", "fold_1": "FAILED"}

    first = cv()
    assert _statuses(run_dir) == {"parent": "FINISHED", "fold_0": "FINISHED", "fold_1": "FINISHED"}
    assert first.registered["version"] == "1" and first.registered["champion"]
    again = cv()  # --resume of a finished experiment
    assert again.registered["version"] == "1" and again.registered["model_uri"] == first.registered["model_uri"]
    assert _statuses(run_dir)["parent"] == "FINISHED"
    client = MlflowClient()
    assert [str(mv.version) for mv in client.search_model_versions("name='msata-crema-d'")] == ["1"]
    experiment_id = client.get_run(first.parent_run_id).info.experiment_id
    assert len(client.search_logged_models([experiment_id])) == 1  # the model was not logged twice either


def test_speaker_normalised_experiments_are_a_protocol_of_their_own(tmp_path) -> None:
    from training_fixtures import TINY_MODEL, build_tiny_store

    from modeling.data.splits import SplitConfig
    from modeling.training.experiment import load_spec, prepare_experiment
    from modeling.training.train_loop import TrainConfig

    store = build_tiny_store(tmp_path / "store")
    specs = [
        load_spec(
            prepare_experiment(
                store.url,
                "crema_d",
                TrainConfig(epochs=1, speaker_norm=norm),
                SplitConfig(n_folds=2),
                TINY_MODEL,
                run_dir=tmp_path / f"run{norm}",
                logger=NullRunLogger(),
            )
        )
        for norm in (False, True)
    ]
    assert specs[0].protocol == "speaker-2fold"
    assert specs[1].protocol == "speaker-2fold+speaker-norm-transductive"  # the registry never compares the two


@pytest.mark.slow
def test_refit_retrains_on_training_and_validation_speakers_and_tests_that_model(home, store, tmp_path):
    import json

    from modeling.training.checkpoint import load_checkpoint
    from modeling.training.experiment import load_spec, run_cross_validation

    cfg = TrainConfig(epochs=3, patience=5, batch_size=4, lr=3e-3, warmup_epochs=0.5, num_workers=0, max_duration_s=1.5, refit=True)
    events = []
    result = run_cross_validation(
        store, "crema-d", cfg, SplitConfig(n_folds=2), TINY_MODEL, run_dir=tmp_path / "run", progress=events.append, logger=NullRunLogger()
    )
    spec = load_spec(tmp_path / "run")
    for fold in result.folds:
        refit_dir = tmp_path / "run" / f"fold_{fold.index}" / "refit"
        assert fold.best_path == str(refit_dir / "best.pt") and fold.selection_test is not None
        refit = load_checkpoint(refit_dir / "best.pt", require_resume=True)
        assert refit["epoch"] == fold.best_epoch  # stopped at the epoch chosen on validation
        steps = {e.phase: e.steps for e in events if e.fold == fold.index and e.kind == "step"}
        assert len(spec.folds[fold.index].val_ids) > 0 and steps["refit"] > steps["train"]  # the validation clips join training
    refit_ends = [e for e in events if e.phase == "refit" and e.kind == "epoch_end"]
    assert sorted({e.fold for e in refit_ends}) == [0, 1]
    assert all(e.epochs == result.folds[e.fold].best_epoch for e in refit_ends)  # a progress bar that completes
    assert {"selection_uar_mean", "selection_uar_std"} <= set(result.extra)
    saved = json.loads((tmp_path / "run" / "cv_result.json").read_text())
    assert saved["folds"][0]["selection_test"] == result.folds[0].selection_test


def test_channel_drop_on_a_log_mel_store_is_refused_before_any_training(home, store, tmp_path) -> None:
    from modeling.data.splits import ProtocolError
    from modeling.training.experiment import prepare_experiment

    with pytest.raises(ProtocolError, match=r"channel_drop = 0.1 masks a pretrained encoder's state channels; .* holds none \(log-mel"):
        prepare_experiment(
            store, "crema-d", TrainConfig(epochs=1), SplitConfig(n_folds=2), TINY_MODEL, run_dir=tmp_path / "run",
            logger=NullRunLogger(), data_overrides={"channel_drop": 0.1},
        )  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_pooled_probe_is_fitted_after_training_mixed_into_the_tested_model_and_reported_beside_it(home, store, tmp_path, capsys):
    import json

    import torch

    from flows.cli_output import print_cv_result
    from modeling.network.pooled_probe import CHECKPOINT_KEY
    from modeling.training.checkpoint import load_checkpoint, load_trained_model
    from modeling.training.experiment import load_spec, run_cross_validation
    from modeling.training.fold_run import PROBED_FILE, loaders
    from modeling.training.metrics import compute_metrics
    from modeling.training.probe_fit import C_GRID
    from modeling.training.train_loop import predict

    cfg = TrainConfig(epochs=2, patience=5, batch_size=4, lr=3e-3, warmup_epochs=0.5, num_workers=0, max_duration_s=1.5, probe_weight=0.5)
    model = TINY_MODEL | {"modalities": ["audio"]}
    result = run_cross_validation(store, "crema-d", cfg, SplitConfig(n_folds=2), model, run_dir=tmp_path / "run", logger=NullRunLogger())
    for fold in result.folds:
        fold_dir = tmp_path / "run" / f"fold_{fold.index}"
        assert fold.best_path == str(fold_dir / PROBED_FILE)  # tested and registered with its probe
        assert CHECKPOINT_KEY in load_checkpoint(fold.best_path) and CHECKPOINT_KEY not in load_checkpoint(fold_dir / "best.pt")
        assert load_trained_model(fold.best_path)[0].pooled_probe.weight == 0.5
        probe = fold.probe
        assert probe["C"] in C_GRID and probe["weight"] == 0.5 and 0.0 <= probe["probe_val_uar"] <= 1.0
        assert probe["val_uar_model"] == pytest.approx(fold.best_val_uar)  # the model alone, as chosen on validation
        assert set(probe["test_model"]) == set(fold.test) and 0.0 <= probe["val_uar_mixed"] <= 1.0
        # the statistics the model computes at inference are those the probe was fitted on: alone (weight 1) through
        # the model, it scores on validation what it scored when its C was chosen
        model = load_trained_model(fold.best_path)[0]
        model.pooled_probe.weight = 1.0
        spec = load_spec(tmp_path / "run")
        _, val_loader, _, _ = loaders(spec, spec.folds[fold.index], spec.train)
        y, probs, _, _ = predict(model, val_loader, torch.device("cpu"))
        assert compute_metrics(y, probs.argmax(1), len(spec.label_names)).uar == pytest.approx(probe["probe_val_uar"])
    assert {"model_alone_uar_mean", "model_alone_uar_std"} <= set(result.extra)
    saved = json.loads((tmp_path / "run" / "cv_result.json").read_text())
    assert saved["folds"][1]["probe"] == result.folds[1].probe
    assert result.selected_fold == max(result.folds, key=lambda f: (f.probe["val_uar_mixed"], -f.index)).index  # the shipped model's
    print_cv_result(result)
    assert "the models alone scored test UAR" in " ".join(capsys.readouterr().out.split())  # rich wraps at 80 columns


def test_probe_weight_outside_0_1_or_an_unknown_mix_is_refused() -> None:
    with pytest.raises(ValueError, match=r"probe_weight=1.5; expected 0 \(off\) or a mixing weight in \(0, 1\]"):
        TrainConfig(probe_weight=1.5)
    with pytest.raises(ValueError, match=r"probe_mix='median'; expected one of \('mean', 'geometric'\)"):
        TrainConfig(probe_weight=0.5, probe_mix="median")


def test_a_pooled_probe_without_audio_is_refused_before_any_training(home, store, tmp_path) -> None:
    from modeling.data.splits import ProtocolError
    from modeling.training.experiment import prepare_experiment

    with pytest.raises(
        ProtocolError, match=r"probe_weight = 0.5 mixes in a probe on pooled audio statistics; this model reads \['video'\]"
    ):
        prepare_experiment(
            store, "crema-d", TrainConfig(epochs=1, probe_weight=0.5), SplitConfig(n_folds=2), TINY_MODEL | {"modalities": ["video"]},
            run_dir=tmp_path / "run", logger=NullRunLogger(),
        )  # fmt: skip
    assert not (tmp_path / "run").exists()
