"""predict-folder: file discovery, per-worker model cache, Parquet/JSONL results, one real flow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.config import FaceConfig, FeatureConfig
from features.synthetic import make_talking_face_clip
from flows.predict import (
    JSONL_NAME,
    PARTS_DIR,
    cached_predictor,
    collect_results,
    find_media,
    predict_chunk,
    run_prediction,
)
from modeling.training.checkpoint import save_checkpoint

LABELS = ["angry", "happy", "neutral"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real (untrained, seeded) tiny checkpoint: the flow is under test here, not the model."""
    import torch

    from modeling.network.encoder import MsataConfig, MsataModel

    torch.manual_seed(0)
    features = FeatureConfig(face=FaceConfig(crop_size=32, detect_every=5))
    config = MsataConfig(n_classes=len(LABELS), d_model=16, n_heads=2, n_layers=1, video_channels=(8,), crop_size=32, dropout=0.0)
    path = tmp_path_factory.mktemp("model") / "best.pt"
    payload = {
        "model_config": config.to_dict(),
        "feature_config": features.to_dict(),
        "label_names": LABELS,
        "state_dict": MsataModel(config).state_dict(),
    }
    return str(save_checkpoint(path, payload))


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    make_talking_face_clip(root / "talk.mp4", duration_s=1.0, fps=15, width=160, height=120, label="happy")
    make_talking_face_clip(root / "sub" / "voice.wav", duration_s=1.0, with_video=False, audio_codec="pcm_s16le")
    (root / "sub" / "broken.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("not media")
    (root / ".cache").mkdir()
    (root / ".cache" / "hidden.wav").write_bytes(b"RIFF")
    return root


def test_find_media_by_extension(media: Path) -> None:
    assert [Path(p).relative_to(media).as_posix() for p in find_media(media)] == ["sub/broken.mp4", "sub/voice.wav", "talk.mp4"]
    assert [Path(p).name for p in find_media(media, recursive=False)] == ["talk.mp4"]
    assert [Path(p).name for p in find_media(media, extensions=["WAV"])] == ["voice.wav"]
    assert find_media(media / "talk.mp4") == [str(media / "talk.mp4")]
    with pytest.raises(FileNotFoundError, match="nope"):
        find_media(media / "nope")


def test_model_is_loaded_once_per_worker(checkpoint: str, tmp_path: Path) -> None:
    assert cached_predictor(checkpoint, "cpu") is cached_predictor(checkpoint, "cpu")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        cached_predictor(str(tmp_path / "missing.pt"), "cpu")


def test_chunks_and_collect_without_prefect(checkpoint: str, media: Path, tmp_path: Path) -> None:
    wav, broken = str(media / "sub" / "voice.wav"), str(media / "sub" / "broken.mp4")
    parts = [
        predict_chunk(checkpoint, [broken], str(tmp_path / PARTS_DIR / "0.jsonl"), str(media), device="cpu"),
        predict_chunk(checkpoint, [wav], str(tmp_path / PARTS_DIR / "1.jsonl"), str(media), device="cpu"),
    ]
    summary = collect_results(parts, str(tmp_path), LABELS)
    frame = pd.read_parquet(summary.parquet_path)
    assert frame["path"].tolist() == [broken, wav]
    assert (summary.n_files, summary.n_ok, summary.n_failed) == (2, 1, 1)
    assert broken in frame.loc[0, "error"] and pd.isna(frame.loc[1, "error"])
    assert not (tmp_path / PARTS_DIR).exists()


@pytest.mark.slow
def test_predict_folder_flow(checkpoint: str, media: Path, tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    summary = run_prediction(
        checkpoint,
        media,
        tmp_path / "out",
        window_s=0.5,
        hop_s=0.25,
        device="cpu",
        files_per_task=2,
        plots=True,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert (summary.n_files, summary.n_ok, summary.n_failed) == (3, 2, 1)
    frame = pd.read_parquet(summary.parquet_path)
    assert list(frame.columns) == [
        "path",
        "label",
        *(f"prob_{c}" for c in LABELS),
        "n_windows",
        "modalities",
        "duration_s",
        "warnings",
        "error",
    ]
    assert [Path(p).name for p in frame["path"]] == ["broken.mp4", "voice.wav", "talk.mp4"]
    ok = frame[frame["error"].isna()]
    np.testing.assert_allclose(ok[[f"prob_{c}" for c in LABELS]].sum(axis=1), 1.0, atol=1e-5)
    assert ok["label"].isin(LABELS).all() and (ok["n_windows"] == 3).all()
    assert ok.set_index(ok["path"].map(lambda p: Path(p).name))["modalities"].to_dict() == {"voice.wav": "audio", "talk.mp4": "audio,video"}
    lines = [json.loads(line) for line in (tmp_path / "out" / JSONL_NAME).read_text().splitlines()]
    assert [len(line["timeline"]) for line in lines] == [0, 3, 3]
    assert sorted(p.name for p in Path(summary.plot_dir).iterdir()) == ["sub__voice.png", "talk.png"]
    # Polled from this process (finished parts), never sent with the flow's parameters.
    assert progress[0] == (0, 3) and progress[-1] == (3, 3)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert not (tmp_path / "out" / PARTS_DIR).exists()
