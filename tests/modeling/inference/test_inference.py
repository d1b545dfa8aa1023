"""Inference on real media with a really trained (tiny) model: files, windows, fallbacks, errors, MLflow."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.clip import ClipError
from features.config import FaceConfig, FeatureConfig
from features.extract import extract_clip
from features.recipes.folder import prepare_folder
from features.synthetic import make_synthetic_dataset, make_talking_face_clip
from modeling.inference.model_source import find_checkpoint
from modeling.inference.predictions import FilePrediction, paths_from_input, predictions_frame, read_jsonl, write_jsonl
from modeling.inference.predictor import Predictor, load_predictor, predict_files, record_for_file, sliding_windows
from modeling.inference.timeline_plot import plot_timeline
from modeling.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

LABELS = ("happy", "sad")
# Sparse face detection and small crops keep MTCNN and the model cheap on a busy CPU.
FEATURES = FeatureConfig(face=FaceConfig(crop_size=48, detect_every=5))
REPO_ROOT = Path(__file__).resolve().parents[3]
MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 1, "video_channels": [8, 16], "dropout": 0.0}
SIZE = (160, 120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model trained for 2 epochs on synthetic talking faces, through the real pipeline:
    synthetic media -> extract_clip -> FeatureStore -> ClipDataset -> train_model -> best.pt."""
    from features.faces import FaceDetector
    from modeling.data.dataset import ClipDataset, make_loader
    from modeling.network.encoder import MsataConfig, MsataModel
    from modeling.training.train_loop import TrainConfig, train_model
    from storage.feature_store import FeatureStore

    root = tmp_path_factory.mktemp("inference")
    data = make_synthetic_dataset(root / "data", n_speakers=2, clips_per_class=1, classes=LABELS, duration_s=1.0, fps=15, size=SIZE)
    records = prepare_folder(data).records
    store = FeatureStore.create(root / "store", FEATURES)
    detector = FaceDetector(FEATURES.face)
    for record in records:
        store.write(record, extract_clip(record, FEATURES, detector=detector))
    ids = [r.clip_id for r in records]
    labels = [LABELS.index(r.label) for r in records]
    config = TrainConfig(epochs=2, batch_size=4, num_workers=0, device="cpu", max_duration_s=0.8, warmup_epochs=0.5, lambda_ctm=0.1)
    loader = lambda train: make_loader(ClipDataset(str(root / "store"), ids, labels, FEATURES, config.data_config(), train), 4, 0, 0)  # noqa: E731
    model_config = MsataConfig.from_dict(
        {**MODEL, "n_classes": len(LABELS), "n_mels": FEATURES.audio.n_mels, "crop_size": FEATURES.face.crop_size}
    )
    meta = {"model_config": model_config.to_dict(), "feature_config": FEATURES.to_dict(), "label_names": list(LABELS)}
    import torch

    torch.manual_seed(0)  # the initial weights: without it they depend on the tests that ran before in this process
    result = train_model(MsataModel(model_config), loader(True), loader(False), config, root / "run", meta)
    assert result.best_path is not None and result.best_path.is_file()
    media = root / "media"
    clips = {
        "video": data / "clips" / f"spk00_{LABELS[0]}_00.mp4",
        "wav": make_talking_face_clip(media / "voice.wav", duration_s=1.0, with_video=False, audio_codec="pcm_s16le", label="sad").path,
        "silent": make_talking_face_clip(
            media / "silent.mp4", duration_s=1.0, fps=15, width=SIZE[0], height=SIZE[1], with_audio=False
        ).path,
        "blank": make_talking_face_clip(
            media / "blank.mp4", duration_s=1.0, fps=15, width=SIZE[0], height=SIZE[1], blank_frames=range(1000)
        ).path,
    }
    return {
        "root": root,
        "checkpoint": result.best_path,
        "store": root / "store",
        "clips": clips,
        "predictor": load_predictor(str(result.best_path), device="cpu"),
    }


@pytest.fixture(scope="module")
def video_prediction(trained: dict) -> FilePrediction:
    return trained["predictor"].predict_file(trained["clips"]["video"], window_s=0.5, hop_s=0.25)


def assert_probabilities(probs: dict[str, float]) -> None:
    assert list(probs) == list(LABELS)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-5)


# ----------------------------------------------------------------------------- windows (pure)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.05, 30.0), st.floats(0.1, 5.0), st.floats(0.05, 3.0))
def test_sliding_windows_cover_the_clip_with_equal_windows(duration: float, window: float, hop: float) -> None:
    windows = sliding_windows(duration, window, hop)
    starts = np.array([w[0] for w in windows])
    assert windows[0][0] == 0.0
    assert math.isclose(windows[-1][1], duration, abs_tol=1e-5)
    if duration <= window:
        assert windows == [(0.0, duration)]
        return
    assert all(math.isclose(t1 - t0, window, abs_tol=1e-5) for t0, t1 in windows)
    gaps = np.diff(starts)
    assert np.all(gaps > 0) and np.all(gaps <= 1.5 * hop + 1e-5)  # no hole, no duplicate
    assert np.all(np.abs(gaps[:-1] - hop) < 1e-5)  # on the hop grid except the end-aligned one


def test_sliding_windows_examples_and_bad_arguments() -> None:
    assert sliding_windows(3.0, 2.0, 0.5) == [(0.0, 2.0), (0.5, 2.5), (1.0, 3.0)]
    assert sliding_windows(3.3, 2.0, 0.5) == [(0.0, 2.0), (0.5, 2.5), (1.0, 3.0), (1.3, 3.3)]
    assert sliding_windows(3.1, 2.0, 0.5) == [(0.0, 2.0), (0.5, 2.5), (1.1, 3.1)]  # tail < hop/2 replaces the last
    for args in ((1.0, 0.0, 0.5), (1.0, 1.0, -1.0), (0.0, 1.0, 0.5), (math.nan, 1.0, 0.5)):
        with pytest.raises(ValueError):
            sliding_windows(*args)


# ----------------------------------------------------------------------------- files of every kind


@pytest.mark.slow
def test_video_with_sound(trained: dict, video_prediction: FilePrediction) -> None:
    pred = video_prediction
    assert pred.ok and pred.modalities == ["audio", "video"] and pred.clip_strategy == "whole clip"
    assert_probabilities(pred.probabilities)
    assert pred.label == max(pred.probabilities, key=pred.probabilities.get)
    assert pred.duration_s == pytest.approx(1.0, abs=0.05)
    assert [(w.start_s, w.end_s) for w in pred.timeline] == sliding_windows(pred.duration_s, 0.5, 0.25)
    for window in pred.timeline:
        assert_probabilities(window.probabilities)
        # Both streams are cut at the same instants: 0.5 s is 25 log-mel frames and 7-8 frames at 15 fps.
        assert abs(window.n_audio_frames - 25) <= 1 and 7 <= window.n_face_frames <= 8
    assert 1 <= len(pred.thumbnails) <= 6 and pred.thumbnails[0].image.shape == (48, 48, 3)
    assert pred.warnings == []


@pytest.mark.slow
def test_audio_only_wav(trained: dict) -> None:
    pred = trained["predictor"].predict_file(trained["clips"]["wav"], window_s=0.5, hop_s=0.25)
    assert pred.ok and pred.modalities == ["audio"] and pred.thumbnails == []
    assert_probabilities(pred.probabilities)
    assert all(w.n_face_frames == 0 and w.n_audio_frames > 0 for w in pred.timeline)


@pytest.mark.slow
def test_silent_video_uses_the_faces(trained: dict) -> None:
    pred = trained["predictor"].predict_file(trained["clips"]["silent"], window_s=0.5, hop_s=0.25)
    assert pred.ok and pred.modalities == ["video"]
    assert_probabilities(pred.probabilities)
    assert any("no audio stream" in w for w in pred.warnings)
    assert all(w.n_audio_frames == 0 and w.n_face_frames > 0 for w in pred.timeline)


@pytest.mark.slow
def test_video_without_a_face_falls_back_to_audio_with_a_warning(trained: dict) -> None:
    pred = trained["predictor"].predict_file(trained["clips"]["blank"], window_s=0.5, hop_s=0.25)
    assert pred.ok and pred.modalities == ["audio"]
    assert_probabilities(pred.probabilities)
    assert any("no face found" in w and "audio only" in w for w in pred.warnings)


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_crema_d_flv(trained: dict, shared_data: Path) -> None:
    flv = sorted((shared_data / "crema_d_sample" / "VideoFlash").glob("*.flv"))
    if not flv:
        pytest.skip("no CREMA-D .flv in the shared data")
    pred = trained["predictor"].predict_file(flv[0])
    assert pred.ok, pred.error
    assert pred.modalities == ["audio", "video"]
    assert 1.0 < pred.duration_s < 6.0
    assert_probabilities(pred.probabilities)
    assert len(pred.timeline) == len(sliding_windows(pred.duration_s, 2.0, 0.5))
    # 29.97 fps VP6 video (FLV millisecond timestamps): a 2 s window holds ~60 frames, all with the
    # actor's face, and ~100 log-mel frames; the end-aligned window may lose a frame or two at the edge.
    for w in pred.timeline:
        assert math.isclose(w.end_s - w.start_s, 2.0, abs_tol=1e-6)
        assert abs(w.n_audio_frames - 100) <= 2 and abs(w.n_face_frames - 60) <= 2


# ----------------------------------------------------------------------------- model maths on extracted features


@pytest.fixture(scope="module")
def stored_features(trained: dict):
    from storage.feature_store import FeatureStore

    store = FeatureStore.open(trained["store"])
    return store.read(store.clip_ids()[0])


def test_windows_in_a_batch_match_windows_one_by_one(trained: dict, stored_features) -> None:
    predictor: Predictor = trained["predictor"]
    windows = sliding_windows(stored_features.duration_s, 0.5, 0.2) + [(0.0, stored_features.duration_s)]
    batched = predictor.window_probabilities(stored_features, windows)  # (N, C), padded batch
    alone = np.concatenate([predictor.window_probabilities(stored_features, [w]) for w in windows])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert not np.allclose(batched[0], batched[-1], atol=1e-4)  # windows really see different frames


def test_long_clip_is_the_mean_of_training_length_windows(trained: dict, stored_features) -> None:
    predictor = trained["predictor"]
    short = Predictor(predictor.model, predictor.feature_config, predictor.label_names, predictor.device, clip_max_s=0.6, clip_window_s=0.5)
    pred = short.predict_features(stored_features, "x", window_s=0.5, hop_s=0.25)
    clip_windows = sliding_windows(stored_features.duration_s, 0.5, 0.25)
    assert pred.clip_strategy == f"mean of {len(clip_windows)} windows of 0.5 s"
    expected = short.window_probabilities(stored_features, clip_windows).mean(axis=0)
    np.testing.assert_allclose(list(pred.probabilities.values()), expected, atol=1e-6)
    whole = predictor.predict_features(stored_features, "x")  # from the checkpoint: 2 x the 0.8 s training crops
    assert (predictor.clip_window_s, predictor.clip_max_s) == (0.8, 1.6) and whole.clip_strategy == "whole clip"


def test_windows_without_any_token_are_left_empty(trained: dict, stored_features) -> None:
    # Keep only the first 0.4 s of faces and drop the audio: later windows see nothing.
    keep = stored_features.video_times < 0.4
    faces_only = replace(
        stored_features,
        logmel=None,
        audio_times=None,
        face_crops=stored_features.face_crops[keep],
        video_times=stored_features.video_times[keep],
        face_mask=stored_features.face_mask[keep],
    )
    pred = trained["predictor"].predict_features(faces_only, "x", window_s=0.4, hop_s=0.4)
    assert pred.timeline[0].probabilities is not None and pred.timeline[-1].probabilities is None
    assert any("hold no audio frame and no face" in w for w in pred.warnings)
    assert_probabilities(pred.probabilities)


@pytest.mark.slow
def test_audio_only_model_ignores_the_video(trained: dict, tmp_path: Path) -> None:
    payload = load_checkpoint(trained["checkpoint"])
    path = save_checkpoint(tmp_path / "audio_only.pt", {**payload, "modalities": ["audio"]})
    predictor = load_predictor(str(path), device="cpu")
    pred = predictor.predict_file(trained["clips"]["video"])
    assert pred.ok and pred.modalities == ["audio"]
    assert any("trained without video" in w for w in pred.warnings)
    assert predictor._detector is None  # no face detection was run at all
    silent = predict_files(predictor, [trained["clips"]["silent"]])[0]
    assert silent.error is not None and "no stream the model can use" in silent.error


def test_a_seed_ensemble_predicts_its_members_mean_on_every_window(trained: dict, tmp_path: Path) -> None:
    """train.members ships one checkpoint; msata predict reads it as the members' mean class probabilities."""
    import torch

    from modeling.training.checkpoint import ensemble_payload

    torch.manual_seed(0)
    payload = load_checkpoint(trained["checkpoint"])
    other = dict(
        payload, state_dict={k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    )
    paths = [trained["checkpoint"], save_checkpoint(tmp_path / "other.pt", other)]
    ensemble = save_checkpoint(tmp_path / "ensemble.pt", ensemble_payload([payload, other]))
    clip = trained["clips"]["wav"]
    single = [load_predictor(str(p), device="cpu").predict_file(clip, window_s=0.5, hop_s=0.25) for p in paths]
    mixed = load_predictor(str(ensemble), device="cpu").predict_file(clip, window_s=0.5, hop_s=0.25)
    assert mixed.ok and len(mixed.timeline) == len(single[0].timeline) > 1
    assert single[0].timeline[0].probabilities != single[1].timeline[0].probabilities  # two different members
    for k, window in enumerate(mixed.timeline):
        for label in LABELS:
            mean = (single[0].timeline[k].probabilities[label] + single[1].timeline[k].probabilities[label]) / 2
            assert window.probabilities[label] == pytest.approx(mean, abs=1e-5)


# ----------------------------------------------------------------------------- bad inputs, outputs


def test_bad_files_get_an_error_and_the_others_are_predicted(trained: dict, tmp_path: Path) -> None:
    good = trained["clips"]["wav"]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(Path(good).read_bytes()[:60])  # a WAV header and no samples
    empty = tmp_path / "empty.flac"
    empty.touch()
    notes = tmp_path / "notes.txt"
    notes.write_text("not media")
    paths = [good, tmp_path / "missing.mp4", notes, corrupt, truncated, empty, good]
    preds = predict_files(trained["predictor"], paths, window_s=0.5, hop_s=0.5)
    assert [p.ok for p in preds] == [True, False, False, False, False, False, True]
    for pred, path in zip(preds[1:-1], paths[1:-1], strict=False):
        assert str(path) in pred.error and pred.label is None and pred.probabilities == {}
    assert "not found" in preds[1].error and "unsupported file type '.txt'" in preds[2].error
    assert "zero-length" in preds[5].error
    assert preds[0].probabilities == preds[-1].probabilities  # deterministic


def test_model_sources_that_do_not_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_predictor(str(tmp_path / "nowhere.pt"))
    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_predictor(str(not_a_checkpoint))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found 0"):
        find_checkpoint(tmp_path / "empty")


def test_training_folder_resolves_to_best_checkpoint(trained: dict) -> None:
    assert find_checkpoint(trained["checkpoint"].parent) == trained["checkpoint"]


def test_a_fold_folder_resolves_to_the_model_the_fold_tested(tmp_path: Path) -> None:
    fold = tmp_path / "fold_0"
    (fold / "refit").mkdir(parents=True)
    for name in ("best.pt", "last.pt", "refit/best.pt", "refit/last.pt"):
        (fold / name).write_bytes(b"")
    assert find_checkpoint(fold) == fold / "refit" / "best.pt"  # train.refit
    (fold / "ensemble.pt").write_bytes(b"")
    assert find_checkpoint(fold) == fold / "ensemble.pt"  # train.members
    (fold / "probed.pt").write_bytes(b"")
    assert find_checkpoint(fold) == fold / "probed.pt"  # train.probe_weight


def test_frame_jsonl_and_pyfunc_input(trained: dict, tmp_path: Path, video_prediction: FilePrediction) -> None:
    failed = FilePrediction(path="bad.mp4", error="bad.mp4: file not found")
    preds = [video_prediction, failed]
    frame = predictions_frame(preds)
    assert list(frame.columns) == ["path", "label", "prob_happy", "prob_sad", "n_windows", "modalities", "duration_s", "warnings", "error"]
    assert frame.loc[0, "label"] == video_prediction.label and frame.loc[0, "n_windows"] == len(video_prediction.timeline)
    assert frame.loc[0, "prob_sad"] == pytest.approx(video_prediction.probabilities["sad"])
    assert pd.isna(frame.loc[1, "label"]) and np.isnan(frame.loc[1, "prob_happy"]) and frame.loc[1, "error"] == failed.error
    assert list(predictions_frame([failed], LABELS).columns)[2:4] == ["prob_happy", "prob_sad"]  # all failed: columns kept
    back = read_jsonl(write_jsonl(preds, tmp_path / "p.jsonl"))
    assert [p.to_dict() for p in back] == [p.to_dict() for p in preds]
    assert paths_from_input(pd.DataFrame({"path": ["a.wav", "b.mp4"]})) == ["a.wav", "b.mp4"]
    assert paths_from_input("a.wav") == ["a.wav"]
    with pytest.raises(ValueError, match="'path' column"):
        paths_from_input(pd.DataFrame({"file": ["a.wav"]}))


def test_record_for_file_picks_streams_by_container(trained: dict) -> None:
    record, notes = record_for_file(trained["clips"]["video"])
    assert record.audio_path == record.video_path == str(trained["clips"]["video"]) and notes == []
    record, _ = record_for_file(trained["clips"]["silent"])
    assert record.audio_path is None and record.video_path is not None
    record, _ = record_for_file(trained["clips"]["wav"])
    assert record.video_path is None and record.audio_path is not None
    with pytest.raises(ClipError, match="unsupported file type"):
        record_for_file("clip.xyz")


def test_predicting_a_file_probes_it_once(trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """msata predict builds the record from ffprobe's answer and hands it to extract_clip, which would otherwise ask again."""
    import features.decode
    import features.extract

    real, calls = features.decode.probe, []

    def counting_probe(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(features.decode, "probe", counting_probe)  # record_for_file's (imported at call time)
    monkeypatch.setattr(features.extract, "probe", counting_probe)  # extract_clip's
    wav = Path(trained["clips"]["wav"])
    trained["predictor"].predict_file(f"{wav.parent}/./{wav.name}")  # a path as a user or a table may spell it
    assert [Path(c) for c in calls] == [wav]  # once, not twice


@pytest.mark.slow
def test_timeline_plot(trained: dict, tmp_path: Path, video_prediction: FilePrediction) -> None:
    from PIL import Image

    out = plot_timeline(video_prediction, tmp_path / "plots" / "timeline.png")
    with Image.open(out) as image:
        assert image.width > 500 and image.height > 250
    wav = trained["predictor"].predict_file(trained["clips"]["wav"])
    assert wav.thumbnails == [] and plot_timeline(wav, tmp_path / "wav.png").is_file()
    with pytest.raises(ValueError, match="failed"):
        plot_timeline(FilePrediction(path="x.mp4", error="broken"), tmp_path / "x.png")


# ----------------------------------------------------------------------------- MLflow


@pytest.mark.slow
def test_mlflow_registry_round_trip(trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored_features) -> None:
    from mlflow import MlflowClient

    from modeling.tracking import registry
    from modeling.tracking import runs as tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # MLflow's URIs are put back by tests/conftest.py
    tracking.configure_tracking()
    experiment = MlflowClient().create_experiment("msata-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = tracking.create_run(experiment, "inference-test")
    model_uri = registry.log_pyfunc_model(run_id, trained["checkpoint"], list(LABELS))
    tags = {
        "dataset": "crema_d",
        "n_folds": 1,
        "splits_hash": "x",
        "feature_config_hash": FEATURES.config_hash(),
        "val_uar_mean": 0.5,
        "test_uar_mean": 0.5,
    }
    registered = registry.register_and_promote(model_uri, "crema-d", tags)
    expected = trained["predictor"].window_probabilities(stored_features, [(0.0, stored_features.duration_s)])
    for uri in (f"models:/{registered.name}@champion", f"models:/{registered.name}/{registered.version}", f"runs:/{run_id}/model"):
        predictor = load_predictor(uri, device="cpu")
        assert predictor.label_names == list(LABELS) and predictor.feature_config == FEATURES
        np.testing.assert_allclose(
            predictor.window_probabilities(stored_features, [(0.0, stored_features.duration_s)]), expected, atol=1e-6
        )
    for bad in (f"models:/{registered.name}@no-such-alias", "models:/no-such-model/1", f"models:/{registered.name}/99"):
        with pytest.raises(ValueError, match="cannot load MLflow model"):
            load_predictor(bad)


@pytest.mark.slow
def test_a_fresh_process_finds_the_registered_model_in_msata_home(trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`msata predict --model models:/NAME@champion` as a user runs it: a new process, no MLFLOW_TRACKING_URI,
    msata's default store under MSATA_HOME, another working directory (MLflow's own default is ./mlflow.db)."""
    import subprocess
    import sys

    from modeling.tracking import registry
    from modeling.tracking import runs as tracking

    home = tmp_path / "home"
    monkeypatch.setenv("MSATA_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure_tracking()  # the default store: sqlite:///HOME/mlflow/mlflow.db
    run_id = tracking.create_run(tracking.get_or_create_experiment("crema-d"), "fresh-process-test")
    model_uri = registry.log_pyfunc_model(run_id, trained["checkpoint"], list(LABELS))
    tags = {"dataset": "crema_d", "n_folds": 1, "splits_hash": "x", "feature_config_hash": FEATURES.config_hash(), "val_uar_mean": 0.5}
    registered = registry.register_and_promote(model_uri, "crema-d", tags | {"test_uar_mean": 0.5})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import sys; from modeling.inference.model_source import resolve_checkpoint\n"
        "with resolve_checkpoint(sys.argv[1]) as path: print(path.name)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, f"models:/{registered.name}@champion"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(".pt")
    assert not (elsewhere / "mlflow.db").exists() and not (elsewhere / "mlruns").exists()
