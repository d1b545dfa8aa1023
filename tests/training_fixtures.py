"""Tiny, learnable feature stores for training tests (no media decoding).

Each clip's log-mel has a raised band of mel bins and its face crops a colour
that both depend on the label, plus noise, so a small model can learn the task
in a few CPU epochs. Some clips are audio-only or video-only, and some frames
have no face, so every code path of the data pipeline is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from features.clip import ClipFeatures
from features.config import AudioConfig, FaceConfig, FeatureConfig
from features.manifest import ClipRecord
from storage.feature_store import FeatureStore

TINY_FEATURES = FeatureConfig(audio=AudioConfig(n_mels=16), face=FaceConfig(crop_size=16))
TINY_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 1, "video_channels": [8, 16], "audio_downsample": 4, "dropout": 0.0, "ctm_dim": 16}
LABELS = ["angry", "disgust", "fearful", "happy", "neutral", "sad"]
VIDEO_FPS = 25.0


def tiny_clip(
    clip_id: str, label_index: int, n_classes: int, duration_s: float, rng: np.random.Generator, audio: bool = True, video: bool = True
) -> ClipFeatures:
    cfg = TINY_FEATURES
    n_mels, size = cfg.audio.n_mels, cfg.face.crop_size
    out = ClipFeatures(clip_id=clip_id, duration_s=duration_s)
    if audio:
        ta = int(duration_s * cfg.audio.frames_per_second)
        logmel = rng.normal(-4.0, 1.0, size=(ta, n_mels)).astype(np.float32)  # (Ta, F)
        times = (np.arange(ta) + 0.5) * cfg.audio.hop_length_s
        band = np.arange(n_mels) * n_classes // n_mels == label_index
        # A 3 Hz on/off pattern in the label's band: it survives the per-utterance,
        # per-channel normalisation of the audio front-end (a constant offset would not).
        logmel[:, band] += 6.0 * (np.sin(2 * np.pi * 3.0 * times) > 0)[:, None]
        out.logmel, out.audio_times = logmel, times
    if video:
        tv = int(duration_s * VIDEO_FPS)
        base = np.zeros(3)
        base[label_index % 3] = 60.0 + 60.0 * (label_index // 3)
        crops = np.clip(base + rng.normal(100.0, 20.0, size=(tv, size, size, 3)), 0, 255).astype(np.uint8)  # (Tv, S, S, 3)
        mask = rng.random(tv) > 0.1
        crops[~mask] = 0
        out.face_crops, out.video_times, out.face_mask = crops, np.arange(tv) / VIDEO_FPS, mask
    return out


def build_tiny_store(
    path: str | Path,
    n_speakers: int = 6,
    clips_per_speaker: int = 6,
    labels: list[str] | None = None,
    dataset: str = "crema_d",
    seed: int = 0,
    splits: dict[str, str] | None = None,  # speaker -> split, for folder datasets
) -> FeatureStore:
    labels = labels or LABELS
    rng = np.random.default_rng(seed)
    store = FeatureStore.create(str(path), TINY_FEATURES)
    for s in range(n_speakers):
        speaker = f"spk{s:02d}"
        for c in range(clips_per_speaker):
            k = (c + s) % len(labels)
            clip_id = f"{speaker}_{c:02d}"
            kind = c % 6
            features = tiny_clip(clip_id, k, len(labels), float(rng.uniform(2.0, 3.0)), rng, audio=kind != 4, video=kind != 5)
            record = ClipRecord(
                clip_id=clip_id,
                dataset=dataset,
                speaker=speaker,
                label=labels[k],
                audio_path=f"/nowhere/{clip_id}.wav" if features.has_audio else None,
                video_path=f"/nowhere/{clip_id}.mp4" if features.has_video else None,
                split=splits.get(speaker) if splits else None,
            )
            store.write(record, features)
    return FeatureStore.open(str(path))


def tiny_loaders(
    store_path: str | Path,
    batch_size: int = 4,
    num_workers: int = 0,
    seed: int = 0,
    max_duration_s: float = 1.5,
    rank: int = 0,
    world_size: int = 1,
):
    """(train, val) loaders of a tiny store: speakers 0-3 train, 4-5 validation (this rank's share of each)."""
    from modeling.data.dataset import ClipDataset, make_loader
    from modeling.data.examples import DataConfig

    store = FeatureStore.open(str(store_path))
    m = store.manifest()
    index = {name: i for i, name in enumerate(LABELS)}
    val_mask = m["speaker"].isin(["spk04", "spk05"])
    cfg = DataConfig(max_duration_s=max_duration_s, seed=seed)

    def loader(rows, train: bool):
        ds = ClipDataset(str(store_path), rows["clip_id"].tolist(), [index[x] for x in rows["label"]], store.config, cfg, train)
        return make_loader(ds, batch_size, num_workers, seed, rank=rank, world_size=world_size)

    return loader(m[~val_mask], True), loader(m[val_mask], False)


def tiny_meta() -> dict:
    from modeling.training.experiment_spec import build_model_config

    return {
        "model_config": build_model_config(TINY_MODEL, TINY_FEATURES, len(LABELS)),
        "feature_config": TINY_FEATURES.to_dict(),
        "label_names": list(LABELS),
    }


def tiny_model(seed: int = 0):
    """A fresh MsataModel for the tiny store, its initial weights fixed by ``seed``."""
    import torch

    from modeling.network.encoder import MsataConfig, MsataModel

    torch.manual_seed(seed)
    return MsataModel(MsataConfig.from_dict(tiny_meta()["model_config"]))
