"""Pure parts of the cross-validation driver."""

from __future__ import annotations

import pandas as pd

from modeling.experiment import trained_modalities


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

from modeling.splits import SplitConfig  # noqa: E402
from modeling.train_loop import TrainConfig  # noqa: E402
from training_fixtures import TINY_MODEL, build_tiny_store  # noqa: E402


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
    from modeling.experiment import prepare_experiment

    return prepare_experiment(store, "crema-d", TrainConfig(epochs=1), SplitConfig(n_folds=2), TINY_MODEL, run_dir=run_dir, resume=resume, track=False)


def test_a_foreign_folder_is_refused_and_left_alone(home, store, tmp_path):
    from modeling.experiment import RunDirError

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
    from modeling import splits

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(splits, "export_splits", killed)
    with pytest.raises(KeyboardInterrupt):
        _prepare(store, tmp_path / "run")
    monkeypatch.undo()
    assert (tmp_path / "run" / "experiment.json").is_file()
    assert (_prepare(store, tmp_path / "run", resume=True) / "splits.json").is_file()
