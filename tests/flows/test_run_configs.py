"""Every run config in infra/configs/ loads the way ``msata train --config`` loads it and builds a model.

A config names its store only in its header comment (``msata train --dataset ravdess``,
a store built ``--audio-encoder whisper-base``); the model's input sizes come from that
store, so the test reads the same comment a user would follow.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from features.config import AudioEncoderConfig, FeatureConfig
from features.recipes import fixed_labels
from flows.cli import _load_overrides
from flows.train import train_msata
from modeling.data.splits import SplitConfig
from modeling.network.batch import ClipExample, collate
from modeling.network.encoder import MsataConfig, MsataModel
from modeling.training.experiment_spec import build_model_config, make_data_config
from modeling.training.train_loop import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "infra" / "configs").glob("*.toml"))


def test_there_are_configs_to_check() -> None:
    assert len(CONFIGS) >= 3, CONFIGS


def store_config_named_in(text: str) -> FeatureConfig:
    """The feature config of the store a run config's header comment asks for (log-mel unless it names an encoder)."""
    encoder = re.search(r"--audio-encoder[ =]([\w.-]+)", text)
    return FeatureConfig(audio_encoder=AudioEncoderConfig(name=encoder.group(1))) if encoder else FeatureConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_run_config_parses_into_the_typed_configs_and_builds_a_model(path: Path) -> None:
    text = path.read_text()
    dataset = re.search(r"--dataset[ =](\S+)", text)
    assert dataset, f"{path.name}: the header should show the `msata train --dataset ...` command it is for"
    labels = fixed_labels(dataset.group(1))
    assert labels, f"{path.name}: --dataset {dataset.group(1)} is not a corpus with a fixed label set"

    overrides = _load_overrides(path)  # what `msata train --config` does: [train], [model], [splits], [data] only
    params = {
        "store_path": "unused",
        "dataset": dataset.group(1),
        "train": overrides.get("train", {}),
        "splits": overrides.get("splits", {}),
        "model": overrides.get("model", {}),
        "data": overrides.get("data", {}),
    }
    validated = train_msata.validate_parameters(params)  # the flow's own check: unknown keys and wrong types fail here
    train, splits = validated["train"].to_config(), validated["splits"].to_config()
    assert isinstance(train, TrainConfig) and isinstance(splits, SplitConfig)
    assert {k: getattr(train, k) for k in overrides.get("train", {})} == overrides.get("train", {})  # nothing dropped on the way
    assert {k: getattr(splits, k) for k in overrides.get("splits", {})} == overrides.get("splits", {})
    data = make_data_config(train, validated["data"].overrides())
    assert {k: getattr(data, k) for k in overrides.get("data", {})} == overrides.get("data", {})

    feature_config = store_config_named_in(text)
    model_config = MsataConfig.from_dict(build_model_config(validated["model"].overrides(), feature_config, len(labels)))
    for key, value in overrides.get("model", {}).items():
        assert getattr(model_config, key) == (tuple(value) if isinstance(value, list) else value), key
    model = MsataModel(model_config).eval()

    # One second of audio-only input of the store's shape goes through: the sizes agree end to end.
    frames = 50
    if model_config.audio_layers:
        audio = torch.randn(frames, model_config.audio_layers, model_config.audio_width).half()
    else:
        audio = torch.randn(frames, model_config.n_mels)
    crop = model_config.crop_size
    example = ClipExample(
        audio=audio,
        audio_times=torch.arange(frames) / 50.0,
        video=torch.zeros(0, crop, crop, 3, dtype=torch.uint8),
        video_times=torch.zeros(0),
        face_mask=torch.zeros(0, dtype=torch.bool),
        label=0,
        clip_id="one-second",
    )
    with torch.no_grad():
        logits = model(collate([example])).logits
    assert logits.shape == (1, len(labels)) and torch.isfinite(logits).all()
