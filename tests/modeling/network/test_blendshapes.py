"""The blendshape video front-end: data path (Tv, 52) float32 with times and mask, the model's
MLP front-end chosen from the store's face representation, masking and padding invariance,
CTM on its tokens, and a tiny cross-validation + prediction on a blendshape store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from features.clip import ClipFeatures
from features.config import AudioConfig, FaceConfig, FeatureConfig
from features.face_landmarks import BLENDSHAPE_NAMES, N_BLENDSHAPES
from features.manifest import ClipRecord
from modeling.data.examples import features_to_example, model_input_settings, video_frame_shape
from modeling.network.batch import ClipExample, collate
from modeling.network.encoder import MsataConfig, MsataModel
from modeling.network.frontends import BlendshapeFrontend
from modeling.network.losses import ctm_loss_from_output

BLEND = FeatureConfig(audio=AudioConfig(n_mels=16), face=FaceConfig(representation="blendshapes"))
LABELS = ["happy", "sad"]
SMILE = [BLENDSHAPE_NAMES.index("mouthSmileLeft"), BLENDSHAPE_NAMES.index("mouthSmileRight")]
FPS = 30.0


def blend_clip(
    clip_id: str, label: int, duration_s: float, rng: np.random.Generator, audio: bool = True, video: bool = True
) -> ClipFeatures:
    """Scores near 0.1 with noise; "happy" (0) smiles (mouthSmile ~0.8), "sad" does not. 10 % of frames have no face."""
    out = ClipFeatures(clip_id=clip_id, duration_s=duration_s)
    if audio:
        ta = int(duration_s * 100)
        out.logmel = rng.normal(-4.0, 1.0, size=(ta, 16)).astype(np.float32)  # (Ta, F), no label in it
        out.audio_times = (np.arange(ta) + 0.5) * 0.01
    if video:
        tv = int(duration_s * FPS)
        scores = np.clip(rng.normal(0.1, 0.05, size=(tv, N_BLENDSHAPES)), 0, 1).astype(np.float32)  # (Tv, 52)
        if label == 0:
            scores[:, SMILE] = np.clip(rng.normal(0.8, 0.05, size=(tv, 2)), 0, 1)
        mask = rng.random(tv) > 0.1
        scores[~mask] = 0.0
        out.face_blendshapes, out.video_times, out.face_mask = scores, np.arange(tv) / FPS, mask
    return out


def model_config(**overrides: object) -> MsataConfig:
    base = dict(n_classes=2, n_mels=16, d_model=32, n_heads=2, n_layers=1, dropout=0.0, ctm_dim=16, video_input="blendshapes")
    return MsataConfig(**(base | overrides))  # type: ignore[arg-type]


def example(tv: int, seed: int, faces_every: int = 1) -> ClipExample:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(tv, dtype=torch.bool)
    mask[::faces_every] = True
    return ClipExample(
        audio=torch.randn(tv * 2, 16, generator=g),
        audio_times=torch.arange(tv * 2) / 50.0,
        video=torch.rand(tv, N_BLENDSHAPES, generator=g),
        video_times=torch.arange(tv) / FPS,
        face_mask=mask,
        label=seed % 2,
        clip_id=f"c{seed}",
    )


def test_store_decides_the_video_input_and_frame_shape() -> None:
    assert model_input_settings(BLEND)["video_input"] == "blendshapes"
    assert model_input_settings(FeatureConfig())["video_input"] == "crops"
    assert video_frame_shape(BLEND) == ((52,), np.dtype(np.float32))
    assert video_frame_shape(FeatureConfig()) == ((96, 96, 3), np.dtype(np.uint8))
    with pytest.raises(ValueError, match="'mesh'"):
        MsataConfig(video_input="mesh")
    assert isinstance(MsataModel(model_config()).video_frontend, BlendshapeFrontend)


def test_features_to_example_cuts_blendshapes_with_times_and_mask() -> None:
    from modeling.data.examples import DataConfig

    clip = blend_clip("c", 0, 2.0, np.random.default_rng(0))
    ex = features_to_example(clip, BLEND, 0, (0.5, 1.5))
    keep = (clip.video_times >= 0.5) & (clip.video_times < 1.5)
    assert ex.video.shape == (int(keep.sum()), 52) and ex.video.dtype == torch.float32
    np.testing.assert_allclose(ex.video_times.numpy(), clip.video_times[keep] - 0.5, atol=1e-6)
    assert torch.equal(ex.face_mask, torch.from_numpy(clip.face_mask[keep]))
    # augmentation leaves the scores alone (no pixel jitter for blendshapes)
    augmented = features_to_example(clip, BLEND, 0, (0.5, 1.5), DataConfig(), np.random.default_rng(3))
    assert torch.equal(augmented.video, ex.video)
    audio_only = features_to_example(blend_clip("a", 0, 1.0, np.random.default_rng(1), video=False), BLEND, 0, (0.0, math.inf))
    assert audio_only.video.shape == (0, 52) and audio_only.video.dtype == torch.float32
    crops = ClipFeatures("x", 1.0, face_crops=np.zeros((3, 96, 96, 3), np.uint8), video_times=np.arange(3) / 30, face_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"shape \(96, 96, 3\), the feature config gives \(52,\)"):
        features_to_example(crops, BLEND, 0, (0.0, math.inf))


def test_collate_refuses_mixed_frame_shapes() -> None:
    crop_like = example(5, 1)
    crop_like.video = torch.zeros(5, 16, 16, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="video frames of different shapes"):
        collate([example(5, 0), crop_like])


def test_one_token_per_frame_masked_and_padding_invariant() -> None:
    torch.manual_seed(0)
    model = MsataModel(model_config()).eval()
    short = example(12, 1, faces_every=3)
    batch = collate([short, example(30, 2)])
    assert batch.video.shape == (2, 30, 52) and batch.video.dtype == torch.float32
    out = model(batch)
    assert out.video_tokens.shape == (2, 30, 32) and torch.equal(out.video_mask, batch.video_mask)
    assert torch.all(out.ctm_video[~batch.video_mask] == 0)  # faceless frames and padding are zero tokens
    alone = model(collate([short])).logits
    torch.testing.assert_close(out.logits[:1], alone, atol=1e-5, rtol=1e-4)
    # scores of frames without a face change nothing
    other = ClipExample(**short.__dict__)
    other.video = short.video.clone()
    other.video[~short.face_mask] = 1.0 - other.video[~short.face_mask]
    torch.testing.assert_close(model(collate([other])).logits, alone, atol=1e-6, rtol=1e-6)
    bad = collate([example(4, 3)])
    bad.video = torch.zeros(1, 4, 50)
    with pytest.raises(ValueError, match=r"shape \(50,\), the model expects \(52,\)"):
        model(bad)


@pytest.mark.parametrize("fusion", ["joint", "late"])
def test_ctm_trains_the_blendshape_frontend_and_never_faceless_frames(fusion: str) -> None:
    torch.manual_seed(0)
    model = MsataModel(model_config(fusion=fusion)).train()
    batch = collate([example(20, 1, faces_every=2), example(15, 2)])
    batch.video.requires_grad_(True)
    out = model(batch)
    loss = ctm_loss_from_output(out, projector=model.ctm_head)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    first = model.video_frontend.mlp[0].weight.grad
    assert first is not None and first.abs().sum() > 0
    assert torch.all(batch.video.grad[~batch.video_mask] == 0) and batch.video.grad[batch.video_mask].abs().sum() > 0


@pytest.mark.parametrize("kept", [("audio",), ("video",)])
def test_a_left_out_modality_is_never_fed(kept: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = MsataModel(model_config(modalities=list(kept))).eval()
    assert model.config.modalities == kept and MsataConfig.from_dict(model.config.to_dict()) == model.config
    batch = collate([example(10, 1)])
    out = model(batch)
    dropped = "video" if kept == ("audio",) else "audio"
    assert getattr(out, f"{dropped}_tokens").shape[1] == 0
    changed = collate([example(10, 1)])
    getattr(changed, dropped).mul_(0).add_(7)  # anything in the dropped stream changes nothing
    torch.testing.assert_close(model(changed).logits, out.logits)
    with pytest.raises(ValueError, match="modalities='audio'"):
        model_config(modalities="audio")


def build_blend_store(path: Path, n_speakers: int = 4, clips_per_speaker: int = 4) -> None:
    from storage.feature_store import FeatureStore

    rng = np.random.default_rng(0)
    store = FeatureStore.create(str(path), BLEND)
    for s in range(n_speakers):
        for c in range(clips_per_speaker):
            label = (c + s) % 2
            clip_id = f"spk{s}_{c}"
            features = blend_clip(clip_id, label, float(rng.uniform(1.5, 2.0)), rng, video=c != 3 or s != 0)
            record = ClipRecord(clip_id=clip_id, dataset="folder", speaker=f"spk{s}", label=LABELS[label],
                                audio_path=f"/nowhere/{clip_id}.wav", video_path=f"/nowhere/{clip_id}.mp4" if features.has_video else None)  # fmt: skip
            store.write(record, features)


def test_cross_validation_and_prediction_on_a_blendshape_store(tmp_path: Path) -> None:
    from modeling.data.splits import SplitConfig
    from modeling.inference.predictor import load_predictor
    from modeling.training.experiment import run_cross_validation
    from modeling.training.run_logger import NullRunLogger
    from modeling.training.train_loop import TrainConfig
    from storage.feature_store import FeatureStore

    build_blend_store(tmp_path / "store")
    model = {"d_model": 32, "n_heads": 2, "n_layers": 1, "audio_downsample": 4, "ctm_dim": 16}
    train = TrainConfig(epochs=8, batch_size=4, num_workers=0, max_duration_s=1.0, lr=3e-3, lambda_ctm=0.1)
    result = run_cross_validation(
        str(tmp_path / "store"), "folder", train, SplitConfig(n_folds=2), model, run_dir=tmp_path / "run", logger=NullRunLogger()
    )
    assert len(result.folds) == 2
    predictor = load_predictor(result.folds[0].best_path, device="cpu")
    assert predictor.model.config.video_input == "blendshapes" and predictor.feature_config == BLEND
    store = FeatureStore.open(tmp_path / "store")
    happy = store.read("spk1_1")  # label (1 + 1) % 2 = 0: happy
    prediction = predictor.predict_features(happy, "spk1_1", window_s=1.0, hop_s=0.5)
    assert prediction.ok and prediction.modalities == ["audio", "video"] and set(prediction.probabilities) == set(LABELS)
    # the smile is the only label signal, so the model has learnt to read the blendshapes
    assert result.summary["uar_mean"] > 0.5, result.summary
