"""The typed experiment spec: run directories written before it still load and resume, and
augmentation is a setting of the run.

``fixtures/experiment_v1.json`` is the ``experiment.json`` the untyped-dict code wrote for a
tiny store (5 speakers x 4 clips, 2 folds, ``TrainConfig(epochs=1)``, ``TINY_MODEL``; its
``store_path`` and ``mlflow`` block then set to fixed values), and ``experiment_v1.key`` the
run-directory key that code computed for it.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest
from training_fixtures import TINY_MODEL, build_tiny_store

from modeling.data.examples import AUGMENT_FIELDS, DataConfig
from modeling.data.splits import SplitConfig
from modeling.training.experiment_spec import ExperimentSpec, MlflowRef, augmentation, data_overrides, load_spec, make_data_config
from modeling.training.train_loop import TrainConfig

FIXTURES = Path(__file__).parent / "fixtures"
V1 = json.loads((FIXTURES / "experiment_v1.json").read_text())
# model settings added since V1, at their defaults
LATER_MODEL = {"audio_frontend": "conv1d", "audio_channels": [16, 32, 64], "audio_layer_mix": "softmax", "audio_utterance_norm": "none"}
V1_KEY = (FIXTURES / "experiment_v1.key").read_text().strip()
DEFAULT_AUGMENTATION = augmentation(DataConfig())  # the [data] settings older specs hold (later ones at their default left out)


def test_a_spec_written_by_the_dict_code_loads_typed(tmp_path: Path) -> None:
    (tmp_path / "experiment.json").write_text(json.dumps(V1))
    spec = load_spec(tmp_path)
    assert isinstance(spec, ExperimentSpec)
    assert spec.train == TrainConfig(epochs=1, ctm_schedule="constant")  # it trained with a constant CTM weight
    assert spec.data == TrainConfig(epochs=1).data_config()  # no [data] then: the defaults
    assert spec.splits == SplitConfig(n_folds=2)
    assert len(spec.folds) == 2 and spec.folds[0].test_speakers == ("spk01", "spk02", "spk03")
    assert spec.model.d_model == TINY_MODEL["d_model"] and spec.model.n_classes == len(spec.label_names)
    assert spec.feature_config.config_hash() == spec.feature_config_hash
    assert spec.mlflow == MlflowRef("1", "0123456789abcdef")
    assert spec.modalities == V1["modalities"]


def test_the_json_form_keeps_the_old_keys_and_the_run_key() -> None:
    spec = ExperimentSpec.from_dict(V1)
    # every old key, value for value; settings added since appear at their defaults
    assert spec.to_dict() == V1 | {
        "data": DEFAULT_AUGMENTATION,
        "train": V1["train"]
        | {"refit": False, "ctm_schedule": "constant", "ema_decay": 0.0, "probe_weight": 0.0, "probe_mix": "mean", "mixup_alpha": 0.0}
        | {"members": 1},
        "model": V1["model"] | LATER_MODEL,
        "copies_hash": None,
    }
    assert spec.run_key() == V1_KEY  # `--resume` without --run-dir finds the old directory
    assert ExperimentSpec.from_dict(spec.to_dict()) == spec


def test_a_spec_from_before_modalities_were_recorded_loads() -> None:
    old = {k: v for k, v in V1.items() if k not in ("modalities", "mlflow")}
    spec = ExperimentSpec.from_dict(old)
    assert spec.modalities is None and spec.mlflow is None


def test_a_run_dir_written_by_the_dict_code_resumes(tmp_path: Path, monkeypatch) -> None:
    from modeling.training.experiment import prepare_experiment
    from modeling.training.run_logger import NullRunLogger

    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    store = build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = V1 | {"store_path": store.url, "mlflow": None}
    old["train"] = old["train"] | {"lr": 1e-2}  # a resume keeps the experiment's own training settings
    (run_dir / "experiment.json").write_text(json.dumps(old))
    prepare_experiment(
        store.url,
        "crema-d",
        TrainConfig(epochs=1, num_workers=0),
        SplitConfig(n_folds=2),
        TINY_MODEL,
        run_dir=run_dir,
        resume=True,
        logger=NullRunLogger(),
    )
    spec = load_spec(run_dir)
    # only the workers (and cache) follow the new call; the CTM schedule is the one the old run trained with
    assert spec.train == TrainConfig(epochs=1, lr=1e-2, num_workers=0, ctm_schedule="constant")
    later = {"data": DEFAULT_AUGMENTATION, "model": old["model"] | LATER_MODEL, "copies_hash": None}
    assert spec.to_dict() | {"train": old["train"]} == old | later


def test_augmentation_is_a_setting_of_the_run(tmp_path: Path, monkeypatch) -> None:
    from modeling.data.splits import ProtocolError
    from modeling.training.experiment import prepare_experiment
    from modeling.training.run_logger import NullRunLogger

    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    store = build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)

    def prepare(data, resume=False):
        return prepare_experiment(
            store.url,
            "crema-d",
            TrainConfig(epochs=1),
            SplitConfig(n_folds=2),
            TINY_MODEL,
            run_dir=tmp_path / "run",
            resume=resume,
            logger=NullRunLogger(),
            data_overrides=data,
        )

    default = load_spec(prepare(None))
    custom = load_spec(prepare({"time_masks": 0, "crop_jitter_px": 0}))
    assert (custom.data.time_masks, custom.data.crop_jitter_px, custom.data.freq_masks) == (0, 0, DataConfig().freq_masks)
    assert json.loads((tmp_path / "run" / "experiment.json").read_text())["data"]["time_masks"] == 0
    assert custom.run_key() != default.run_key()  # results depend on it: another default run directory
    with pytest.raises(ProtocolError, match="data changed"):
        prepare({"time_masks": 1}, resume=True)


def test_settings_added_later_stay_out_of_older_runs_data() -> None:
    # A [data] table written before speed copies and channel masks existed: its spec's data, and so
    # its run key, must not gain them at their defaults (LATER_DATA_DEFAULTS).
    assert augmentation(DataConfig(time_masks=0)) == {
        "time_masks": 0, "time_mask_max_frames": 10, "freq_masks": 2, "freq_mask_max_bins": 8, "crop_jitter_px": 4,
    }  # fmt: skip
    assert augmentation(DataConfig(speed_copies=True, channel_drop=0.1))["channel_drop"] == 0.1


def test_data_overrides_take_augmentation_only() -> None:
    assert make_data_config(TrainConfig(max_duration_s=3.0), {"freq_masks": 0}) == replace(DataConfig(max_duration_s=3.0), freq_masks=0)
    with pytest.raises(ValueError, match=r"\['max_duration_s'\] are set in \[train\]"):
        data_overrides({"max_duration_s": 2.0})
    with pytest.raises(ValueError, match="unknown data keys"):
        data_overrides({"time_mask": 1})


def test_each_loader_default_lives_in_one_place() -> None:
    """DataConfig's fields other than the augmentation mirror TrainConfig's: same defaults."""
    shared = [f.name for f in fields(DataConfig) if f.name not in AUGMENT_FIELDS]
    assert set(shared) <= {f.name for f in fields(TrainConfig)}
    assert TrainConfig().data_config() == DataConfig()
