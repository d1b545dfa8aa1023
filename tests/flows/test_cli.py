"""The msata CLI's own behaviour, in-process with typer's CliRunner: help, errors, compare, feature settings."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.cli_support import UserError, feature_config_from

runner = CliRunner()


def flat(text: str) -> str:
    """Help text without rich's box drawing and line wrapping."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


def test_train_help_keeps_the_config_table_names() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "[train], [model], [splits] and [data]" in text, text
    assert "5 for CREMA-D, 5 for RAVDESS" not in text
    assert "(default 5;" in text
    assert "[audio], [face]" in flat(runner.invoke(app, ["preprocess", "--help"]).output)


def test_missing_store_is_one_line_and_verbose_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-store"
    result = runner.invoke(app, ["train", "--store", str(missing), "--dataset", "crema-d"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) <= 2 and lines[0].startswith("error:") and str(missing) in lines[0], result.output
    assert "Traceback" not in result.output
    verbose = runner.invoke(app, ["--verbose", "train", "--store", str(missing), "--dataset", "crema-d"])
    assert verbose.exit_code != 0 and verbose.exception is not None and str(missing) in str(verbose.exception)


def test_train_config_typo_is_one_line_before_any_flow_run(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text('{"train": {"epoch": 3}}')
    result = runner.invoke(app, ["train", "--store", str(tmp_path / "no-store"), "--dataset", "crema-d", "--config", str(config)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "train.epoch" in lines[0] and "Extra inputs are not permitted" in lines[0], result.output


@pytest.mark.usefixtures("prefect_harness")  # `msata train` runs the train-msata flow: it needs an API
def test_wrong_dataset_for_a_store_is_one_line(tmp_path: Path) -> None:
    from training_fixtures import build_tiny_store

    store = tmp_path / "store"
    build_tiny_store(store, n_speakers=4, clips_per_speaker=2, labels=["calm", "happy"])  # "calm" is RAVDESS-only
    result = runner.invoke(app, ["train", "--store", str(store), "--dataset", "crema-d", "--folds", "2", "--no-register"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) <= 3 and "error:" in lines[0] and "calm" in lines[0], result.output
    assert "Traceback" not in result.output


def test_wrong_dataset_for_a_folder_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    (root / "AudioWAV").mkdir(parents=True)
    for name in ("holiday.mp4", "AudioWAV/speech.wav"):
        (root / name).write_bytes(b"")
    args = ["preprocess", "--dataset", "ravdess", "--root", str(root), "--store", str(tmp_path / "store")]
    for dataset, expected in (("ravdess", "no clip under"), ("crema-d", "no clip under")):
        args[2] = dataset
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.output.splitlines()
        assert lines[0].startswith(f"error: {expected}") and dataset in lines[0] and "--dataset" in lines[0], result.output
        assert len(lines) == 2 and "Traceback" not in result.output
    flat_folder = runner.invoke(
        app, ["preprocess", "--dataset", "crema-d", "--root", str(root / "AudioWAV"), "--store", str(tmp_path / "store")]
    )
    assert flat_folder.exit_code == 2 and flat_folder.output.startswith("error:") and "CREMA-D" in flat_folder.output, flat_folder.output
    assert not (tmp_path / "store").exists()


def _register_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("msata-crema-d")
    tags = {
        "dataset": "crema-d",
        "n_folds": "5",
        "splits_hash": "a" * 12,
        "feature_config_hash": "b" * 12,
        "protocol": "speaker-5fold",
        "val_uar_mean": "0.61",
        "test_uar_mean": "0.5",
        "test_uar_std": "0.1",
        "test_wa_mean": "0.52",
        "test_wa_std": "0.08",
        "test_macro_f1_mean": "0.48",
        "test_macro_f1_std": "0.09",
        "selected_fold": "2",
        "selected_fold_val_uar": "0.66",
        "parent_run_id": "c" * 32,
    }
    source = tmp_path / "model"
    source.mkdir()
    client.create_model_version("msata-crema-d", str(source), tags=tags)
    client.set_registered_model_alias("msata-crema-d", "champion", "1")


def test_compare_is_readable_and_exports_every_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register_versions(tmp_path, monkeypatch)
    result = CliRunner(env={"COLUMNS": "120"}).invoke(app, ["compare"])
    assert result.exit_code == 0, result.output
    assert "0.500 ± 0.100" in result.output and "champion" in result.output, result.output
    assert "parent_run_id" not in result.output and "…" not in result.output, result.output

    as_json = runner.invoke(app, ["compare", "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.output)
    assert len(rows) == 1 and rows[0]["test_uar_mean"] == 0.5 and rows[0]["parent_run_id"] == "c" * 32 and rows[0]["aliases"] == "champion"

    as_csv = runner.invoke(app, ["compare", "--format", "csv"])
    assert as_csv.exit_code == 0, as_csv.output
    table = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert len(table) == 1 and table[0]["splits_hash"] == "a" * 12 and float(table[0]["test_wa_std"]) == 0.08


def test_feature_config_from_file_and_overrides(tmp_path: Path) -> None:
    from features.config import FeatureConfig

    path = tmp_path / "features.toml"
    path.write_text("[audio]\nn_mels = 64\n\n[face]\ndetect_every = 2\ncrop_size = 112\n")
    config = feature_config_from(path, {"face.detect_every": 4})
    assert (config.audio.n_mels, config.face.crop_size, config.face.detect_every) == (64, 112, 4)
    assert config.format_version == FeatureConfig().format_version  # a file without it keeps the current format
    assert feature_config_from(None, {"face.detect_every": None}) == FeatureConfig()

    path.write_text("[faces]\ndetect_every = 2\n")
    with pytest.raises(UserError, match=r"unknown feature setting 'faces'"):
        feature_config_from(path)
    path.write_text("[face]\ndetect_evry = 2\n")
    with pytest.raises(UserError, match=r"\[face\]: unknown feature setting 'detect_evry'"):
        feature_config_from(path)
    path.write_text("[face\n")
    with pytest.raises(UserError, match="not valid TOML"):
        feature_config_from(path)
    result = runner.invoke(
        app, ["preprocess", "--dataset", "folder", "--root", str(tmp_path), "--store", str(tmp_path / "s"), "--feature-config", str(path)]
    )
    assert result.exit_code == 2 and result.output.startswith("error:") and "not valid TOML" in result.output, result.output


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_preprocess_sets_feature_settings_from_file_and_option(tmp_path: Path) -> None:
    from features.synthetic import make_synthetic_dataset
    from storage import FeatureStore

    root = make_synthetic_dataset(tmp_path / "raw", n_speakers=1, clips_per_class=1, classes=("happy",), duration_s=1.0, size=(160, 120))
    settings = tmp_path / "features.toml"
    settings.write_text("[face]\ncrop_size = 64\ndetect_every = 2\n")
    store = tmp_path / "store"
    result = runner.invoke(
        app,
        [
            "preprocess",
            "--dataset",
            "folder",
            "--root",
            str(root),
            "--store",
            str(store),
            "--feature-config",
            str(settings),
            "--detect-every",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    config = FeatureStore.open(store).config
    assert (config.face.crop_size, config.face.detect_every) == (64, 3)
    assert "1 done" in result.output
