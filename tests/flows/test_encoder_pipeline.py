"""A pretrained audio encoder end to end, as a user runs it: `msata preprocess --audio-encoder`,
cross-validation on the stored states, and prediction on a new file from the model's recorded
feature config (the encoder runs again at prediction time)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from flow_servers import MSATA, REPO, clean_env, preprocess_synthetic

from features.config import AudioEncoderConfig
from storage import FeatureStore

pytestmark = pytest.mark.slow

TINY_EN = AudioEncoderConfig(name="whisper-tiny.en")


@pytest.fixture(scope="module")
def encoder_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    raw = tmp_path_factory.mktemp("raw")
    store = preprocess_synthetic(raw, tmp_path_factory.mktemp("cli"), "--audio-encoder", "whisper-tiny.en")
    return raw, store


def test_preprocess_stores_encoder_states_with_their_times(encoder_store: tuple[Path, Path]) -> None:
    _, store_path = encoder_store
    store = FeatureStore.open(store_path)
    assert store.config.audio_encoder == TINY_EN  # name, all 5 hidden states, the pinned weights' sha256
    clip = store.read(store.clip_ids()[0])
    assert clip.logmel is None and clip.audio_states.shape[1:] == (5, 384) and clip.audio_states.dtype == np.float16
    assert np.allclose(np.diff(clip.audio_times), 0.02) and abs(len(clip.audio_times) - 50 * clip.duration_s) <= 2
    assert clip.face_crops is not None  # the video side is unchanged


def test_unknown_encoder_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            MSATA,
            "preprocess",
            "--dataset",
            "folder",
            "--root",
            str(tmp_path),
            "--store",
            str(tmp_path / "s"),
            "--audio-encoder",
            "whisper-huge",
        ],
        env=clean_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "unknown audio encoder 'whisper-huge'" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("speaker_norm", [False, True])
def test_train_and_predict_on_encoder_states(encoder_store: tuple[Path, Path], tmp_path: Path, speaker_norm: bool) -> None:
    from modeling.data.splits import SplitConfig
    from modeling.inference.predictor import load_predictor, predict_files
    from modeling.training.experiment import run_cross_validation
    from modeling.training.run_logger import NullRunLogger
    from modeling.training.train_loop import TrainConfig

    raw, store = encoder_store
    model = {
        "d_model": 32,
        "n_heads": 2,
        "n_layers": 1,
        "video_channels": [8, 16],
        "audio_downsample": 2,
        "pooling": "attention",
        "ctm_dim": 16,
    }
    train = TrainConfig(epochs=2, batch_size=4, num_workers=0, speaker_norm=speaker_norm, max_duration_s=1.0)
    result = run_cross_validation(
        str(store), "folder", train, SplitConfig(n_folds=2), model, run_dir=tmp_path / "run", logger=NullRunLogger()
    )
    assert len(result.folds) == 2 and all(0.0 <= f.test["uar"] <= 1.0 for f in result.folds)
    predictor = load_predictor(result.folds[0].best_path, device="cpu")
    assert predictor.feature_config.audio_encoder == TINY_EN and predictor.speaker_norm is speaker_norm
    clips = sorted((raw / "clips").glob("*.mp4"))[:3]
    predictions = predict_files(predictor, clips)
    assert all(p.error is None and p.label in ("happy", "sad") and "audio" in p.modalities for p in predictions), predictions
    assert any("transductive" in w for w in predictions[0].warnings) is speaker_norm


def test_finetuning_the_top_block_starts_from_the_packaged_weights_and_predicts(encoder_store: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    from features.audio_encoders.stage import load_packaged_encoder
    from modeling.data.splits import SplitConfig
    from modeling.inference.predictor import load_predictor, predict_files
    from modeling.training.checkpoint import load_checkpoint
    from modeling.training.experiment import run_cross_validation
    from modeling.training.run_logger import NullRunLogger
    from modeling.training.train_loop import TrainConfig

    raw, store = encoder_store
    model = {"d_model": 32, "n_heads": 2, "n_layers": 1, "video_channels": [8, 16], "audio_finetune_blocks": 1, "ctm_dim": 16}
    train = TrainConfig(epochs=1, batch_size=4, num_workers=0, max_duration_s=1.0, encoder_lr_scale=0.5)
    result = run_cross_validation(
        str(store), "folder", train, SplitConfig(n_folds=2), model, run_dir=tmp_path / "run", logger=NullRunLogger()
    )
    payload = load_checkpoint(result.folds[0].best_path)
    packaged = load_packaged_encoder("whisper-tiny.en", "cpu").blocks[-1].state_dict()
    trained = {
        k.removeprefix("audio_frontend.top_blocks.0."): v
        for k, v in payload["state_dict"].items()
        if k.startswith("audio_frontend.top_blocks.0.")
    }
    assert trained.keys() == packaged.keys()
    moved = [k for k in packaged if not torch.equal(trained[k].float(), packaged[k].float())]
    assert moved, "the fine-tuned block never left the packaged weights"
    assert max((trained[k].float() - packaged[k].float()).abs().max().item() for k in packaged) < 0.5  # started there, moved a little
    predictions = predict_files(load_predictor(result.folds[0].best_path, device="cpu"), sorted((raw / "clips").glob("*.mp4"))[:2])
    assert all(p.error is None and p.label in ("happy", "sad") for p in predictions), predictions


def test_channel_drop_is_a_setting_of_frozen_state_runs_only(encoder_store: tuple[Path, Path], tmp_path: Path) -> None:
    from modeling.data.splits import ProtocolError, SplitConfig
    from modeling.training.experiment import load_spec, prepare_experiment
    from modeling.training.run_logger import NullRunLogger
    from modeling.training.train_loop import TrainConfig

    _, store = encoder_store
    model = {"d_model": 32, "n_heads": 2, "n_layers": 1, "video_channels": [8, 16], "ctm_dim": 16}

    def prepare(name: str, data: dict | None, finetune: int = 0) -> Path:
        return prepare_experiment(
            str(store), "folder", TrainConfig(epochs=1), SplitConfig(n_folds=2), model | {"audio_finetune_blocks": finetune},
            run_dir=tmp_path / name, logger=NullRunLogger(), data_overrides=data,
        )  # fmt: skip

    plain, masked = load_spec(prepare("plain", None)), load_spec(prepare("masked", {"channel_drop": 0.1}))
    assert masked.data.channel_drop == 0.1 and plain.data.channel_drop == 0.0
    assert masked.run_key() != plain.run_key()
    with pytest.raises(ProtocolError, match="channel_drop = 0.1 with audio_finetune_blocks = 1"):
        prepare("finetuned", {"channel_drop": 0.1}, finetune=1)
    assert not (tmp_path / "finetuned").exists()


def test_a_model_with_a_pooled_probe_predicts_new_files_with_it(encoder_store: tuple[Path, Path], tmp_path: Path) -> None:
    from modeling.data.splits import SplitConfig
    from modeling.inference.predictor import load_predictor, predict_files
    from modeling.training.experiment import run_cross_validation
    from modeling.training.run_logger import NullRunLogger
    from modeling.training.train_loop import TrainConfig

    raw, store = encoder_store
    model = {"d_model": 32, "n_heads": 2, "n_layers": 1, "video_channels": [8, 16], "audio_layer_mix": "concat", "ctm_dim": 16}
    train = TrainConfig(epochs=1, batch_size=4, num_workers=0, max_duration_s=1.0, probe_weight=0.5, probe_mix="geometric")
    result = run_cross_validation(
        str(store), "folder", train, SplitConfig(n_folds=2), model, run_dir=tmp_path / "run", logger=NullRunLogger()
    )
    predictor = load_predictor(result.folds[0].best_path, device="cpu")
    probe = predictor.model.pooled_probe
    assert (
        probe is not None and probe.weight == 0.5 and probe.mix_kind == "geometric" and probe.n_features == 2 * 5 * 384
    )  # mean and std of 5 tiny.en states
    predictions = predict_files(predictor, sorted((raw / "clips").glob("*.mp4"))[:2])
    assert all(p.error is None and p.label in ("happy", "sad") for p in predictions), predictions
    predictor.model.attach_probe(None)  # the same files without the probe: the mixture moved the probabilities
    alone = predict_files(predictor, sorted((raw / "clips").glob("*.mp4"))[:2])
    moved = [max(abs(a.probabilities[k] - p.probabilities[k]) for k in p.probabilities) for a, p in zip(alone, predictions, strict=True)]
    assert max(moved) > 1e-4, moved
