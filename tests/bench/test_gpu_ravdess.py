"""bench/gpu_ravdess.py's fold runner on the CPU: the config's [data] table, speed copies (training
speakers only) and the pooled probe, as msata train applies them; and its tables' validation figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.gpu_ravdess import Clip, markdown, run_fold, save_representation, summarise
from features.config import AudioEncoderConfig
from modeling.data.splits import Fold, fold_to_dict

LABELS = ["calm", "angry"]
SPEAKERS = ["01", "02", "03", "04"]
COPY_SUFFIX = "_sp1.1"


def write_features(directory: Path) -> tuple[list[Clip], dict[str, list[str]]]:
    """Four speakers x four clips of synthetic Whisper-base states (7 x 512 per frame), each with one
    "speed copy"; a label shifts the states so the model can learn it."""
    shape = AudioEncoderConfig(name="whisper-base").state_shape()  # (7, 512)
    rng = np.random.default_rng(0)
    clips, arrays, times, copies = [], [], [], {}
    for speaker in SPEAKERS:
        for i in range(4):
            label = LABELS[i % 2]
            for suffix in ("", COPY_SUFFIX):
                clip = Clip(f"{speaker}-{i}{suffix}", speaker, label, "/synthetic.flac")
                frames = 20 + i
                states = rng.normal(size=(frames, *shape)) + (0.5 if label == "angry" else -0.5)
                clips.append(clip)
                arrays.append(states.astype(np.float16))
                times.append(((np.arange(frames) + 0.5) / 50).astype(np.float32))
                if suffix:
                    copies.setdefault(clip.clip_id.removesuffix(suffix), []).append(clip.clip_id)
    save_representation(directory, arrays, times, clips)
    return clips, copies


def job(tmp_path: Path, speed_copies: bool) -> dict:
    clips, copies = write_features(tmp_path / "features")
    ids = {s: tuple(c.clip_id for c in clips if c.speaker == s and COPY_SUFFIX not in c.clip_id) for s in SPEAKERS}
    fold = Fold(0, ids["01"] + ids["02"], ids["03"], ids["04"], ("01", "02"), ("03",), ("04",))
    return {
        "config": "tiny",
        "encoder": "whisper-base",
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "probe_weight": 0.5, "probe_mix": "geometric", "seed": 0},
        "data": {"speed_copies": speed_copies},
        "copies": copies,
        "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "audio_downsample": 2, "audio_layer_mix": "concat"},
        "fold": fold_to_dict(fold),
        "labels": LABELS,
        "label_of": {c.clip_id: c.label for c in clips},
        "speaker_of": {c.clip_id: c.speaker for c in clips},
        "features": str(tmp_path / "features"),
        "weights": "",
        "sha256": {},
        "device": "cpu",
        "run_dir": str(tmp_path / "run"),
    }


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """run_fold sets one torch thread (it is one of many processes on a GPU machine); later tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def datasets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[str, ...], bool]]:
    """The (clip ids, train) of every ClipDataset the fold builds."""
    import modeling.data.dataset as dataset_module

    built: list[tuple[tuple[str, ...], bool]] = []
    real = dataset_module.ClipDataset

    def spy(store_path, clip_ids, labels, feature_config, config, train, *args, **kwargs):
        built.append((tuple(clip_ids), train))
        return real(store_path, clip_ids, labels, feature_config, config, train, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "ClipDataset", spy)
    return built


def copies_of(built: list[tuple[tuple[str, ...], bool]], speaker: str) -> list[str]:
    return [c for ids, _ in built for c in ids if c.startswith(f"{speaker}-") and c.endswith(COPY_SUFFIX)]


@pytest.mark.parametrize("speed_copies", [True, False])
def test_a_fold_trains_with_copies_only_when_asked_and_ships_the_probe(tmp_path: Path, speed_copies: bool, datasets) -> None:
    row = run_fold(job(tmp_path, speed_copies))
    probe = row["probe"]
    # the probe is fitted on the 8 training recordings, and their 8 copies only with [data] speed_copies
    assert probe["n_fit"] == (16 if speed_copies else 8)
    assert bool(copies_of(datasets, "01")) == speed_copies
    # no copy of a validation or test clip is ever read
    assert copies_of(datasets, "03") == [] and copies_of(datasets, "04") == []
    # what the fold ships is the mixture: its validation figure is the mixture's, the model's own beside it
    assert row["shipped_val_uar"] == probe["val_uar_mixed"]
    assert row["best_val_uar"] == probe["val_uar_model"]
    assert set(row["test"]) >= {"wa", "uar", "macro_f1"} and row["test_speakers"] == ["04"]
    assert (tmp_path / "run" / "probed.pt").exists()


def test_a_refit_trains_on_validation_speakers_and_their_copies_never_the_test_ones(tmp_path: Path, datasets) -> None:
    spec = job(tmp_path, speed_copies=True)
    spec["train"] |= {"refit": True}
    row = run_fold(spec)
    assert "refit_test" in row and row["test"] != {}
    assert row["probe"]["n_fit"] == 24  # refitted on training + validation recordings (12) and their copies
    assert copies_of(datasets, "03") and copies_of(datasets, "04") == []
    assert row["shipped_val_uar"] == row["best_val_uar"]  # a refit model has no validation figure of its own


def test_tables_show_the_shipped_validation_figure(tmp_path: Path) -> None:
    scores = {"wa": 0.5, "uar": 0.5, "macro_f1": 0.5}
    rows = [
        {
            "config": "c",
            "fold": k,
            "test": scores,
            "selection_test": scores,
            "probe": {"test_model": scores},
            "best_val_uar": 0.6,
            "shipped_val_uar": 0.7 + k / 10,
            "best_epoch": 1,
            "epochs_run": 2,
            "train_s": 1.0,
            "train_clips_per_s": 1.0,
            "data_wait_share": 0.0,
            "test_speakers": ["04"],
            "val_speakers": ["03"],
        }
        for k in range(2)
    ]
    (entry,) = summarise(rows)
    assert entry["val_uar"] == pytest.approx(0.75) and entry["val_uar_model"] == pytest.approx(0.6)
    assert entry["model_alone_uar"] == (0.5, 0.0)
    path = tmp_path / "folds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = markdown(path)
    assert "| 0.700 |" in table and "| 0.800 |" in table and "| 0.750 |" in table


def test_members_trained_as_jobs_of_their_own_assemble_the_ensemble_the_fold_trains(tmp_path: Path) -> None:
    """--parallel-members: member k as its own job (seed + k), then the fold's ensemble assembled from them, is what
    train.members trains one member after another in the fold's job."""
    base = job(tmp_path, speed_copies=True)
    base["train"] = base["train"] | {"members": 2}
    sequential = run_fold(base | {"run_dir": str(tmp_path / "sequential")})
    members = [
        run_fold(base | {"train": base["train"] | {"seed": k, "members": 1}, "run_dir": str(tmp_path / f"member{k}"), "member": k})
        for k in (0, 1)
    ]
    parallel = run_fold(base | {"run_dir": str(tmp_path / "parallel"), "member_rows": members})
    for key in ("seeds", "best_epochs", "val_uar_members", "val_uar_ensemble", "test_first_member"):
        assert parallel["members"][key] == sequential["members"][key], key
    assert parallel["test"] == sequential["test"] and parallel["shipped_val_uar"] == sequential["shipped_val_uar"]
    assert parallel["probe"]["val_uar_mixed"] == sequential["probe"]["val_uar_mixed"]  # the probe mixed into the ensemble
    assert (tmp_path / "parallel" / "ensemble.pt").is_file() and (tmp_path / "sequential" / "members" / "1" / "best.pt").is_file()
