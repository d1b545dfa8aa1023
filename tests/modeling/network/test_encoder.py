from __future__ import annotations

import dataclasses

import pytest
import torch

from features.audio_encoders.whisper import WhisperEncoder, WhisperEncoderShape
from modeling.network import encoder as encoder_module
from modeling.network.batch import Batch, ClipExample, collate
from modeling.network.encoder import MsataConfig, MsataModel, rotary_positions
from modeling.network.frontends import merge_times, normalise_utterance
from modeling.network.tarope import Rotary, Rotation, rotate

N_MELS, CROP = 16, 16


def tiny_config(**overrides: object) -> MsataConfig:
    base = dict(
        n_classes=3,
        n_mels=N_MELS,
        d_model=32,
        n_heads=2,
        n_layers=2,
        dropout=0.0,
        crop_size=CROP,
        video_channels=(8, 16),
        ctm_dim=16,
    )
    base.update(overrides)
    return MsataConfig(**base)  # type: ignore[arg-type]


def clip(ta: int, tv: int, seed: int, face_every: int = 1, offset: float = 0.0) -> ClipExample:
    g = torch.Generator().manual_seed(seed)
    face_mask = torch.zeros(tv, dtype=torch.bool)
    face_mask[::face_every] = True
    return ClipExample(
        audio=torch.randn(ta, N_MELS, generator=g) * 3 - 5,
        audio_times=torch.arange(ta, dtype=torch.float32) / 50 + 0.0125 + offset,
        video=torch.randint(0, 256, (tv, CROP, CROP, 3), generator=g, dtype=torch.uint8),
        video_times=torch.arange(tv, dtype=torch.float32) / 30 + offset,
        face_mask=face_mask,
        label=seed % 3,
        clip_id=f"c{seed}",
    )


def model_for(**overrides: object) -> MsataModel:
    torch.manual_seed(0)
    return MsataModel(tiny_config(**overrides)).eval()


def test_config_round_trip_and_validation() -> None:
    cfg = tiny_config(positions="index", fusion="late", audio_downsample=2)
    data = cfg.to_dict()
    assert data["video_channels"] == [8, 16]
    assert MsataConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="rotary"):
        tiny_config(positions="rotary")
    with pytest.raises(ValueError, match="early"):
        tiny_config(fusion="early")
    with pytest.raises(ValueError, match="heads"):
        tiny_config(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="bogus"):
        MsataConfig.from_dict({**data, "bogus": 1})


def test_merge_times_is_mean_of_valid_merged_frames() -> None:
    times = torch.tensor([[0.0, 0.02, 0.04, 0.06, 0.08], [0.0, 0.02, 0.04, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    merged, merged_mask = merge_times(times, mask, 2)
    torch.testing.assert_close(merged, torch.tensor([[0.01, 0.05, 0.08], [0.01, 0.04, 0.0]]))
    assert merged_mask.tolist() == [[True, True, True], [True, True, False]]


def test_utterance_normalisation_uses_valid_frames_only() -> None:
    x = torch.randn(1, 30, 4) * 5 + 3
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, :20] = True
    y = normalise_utterance(x, mask)
    torch.testing.assert_close(y[0, :20].mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0, :20].std(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    assert y[0, 20:].abs().max() == 0


@pytest.mark.parametrize("positions", ["tarope", "index", "none"])
@pytest.mark.parametrize("fusion", ["joint", "late"])
def test_output_shapes(positions: str, fusion: str) -> None:
    model = model_for(positions=positions, fusion=fusion, audio_downsample=2)
    batch = collate([clip(51, 30, 1), clip(20, 12, 2)])
    out = model(batch)
    assert out.logits.shape == (2, 3)
    assert out.pooled.shape == (2, 64 if fusion == "late" else 32)
    assert out.audio_tokens.shape == (2, 26, 32) and out.audio_times.shape == (2, 26)
    assert out.video_tokens.shape == (2, 30, 32) and out.video_mask.shape == (2, 30)
    assert out.audio_mask.sum(1).tolist() == [26, 10]
    # Downsampled audio times are the mean of the two merged frame times.
    torch.testing.assert_close(out.audio_times[0, :3], torch.tensor([0.0225, 0.0625, 0.1025]))


@pytest.mark.parametrize("fusion", ["joint", "late"])
def test_padding_and_faceless_frames_do_not_change_the_result(fusion: str) -> None:
    model = model_for(fusion=fusion, audio_downsample=2)
    short = clip(37, 21, 3, face_every=2)
    alone = model(collate([short])).logits
    padded = model(collate([short, clip(90, 55, 4)])).logits[:1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
    # Changing the pixels of frames without a face changes nothing either.
    other = ClipExample(**{**short.__dict__})
    other.video = short.video.clone()
    other.video[~short.face_mask] = 255 - other.video[~short.face_mask]
    torch.testing.assert_close(model(collate([other])).logits, alone, atol=1e-6, rtol=1e-6)


def test_tarope_model_sees_relative_time_only() -> None:
    model = model_for(positions="tarope")
    base = model(collate([clip(60, 36, 5)])).logits
    shifted = model(collate([clip(60, 36, 5, offset=7.3)])).logits
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-3)
    # Moving video against audio by 0.2 s is visible to TaRoPE...
    moved = collate([clip(60, 36, 5)])
    moved.video_times = moved.video_times + 0.2
    assert not torch.allclose(model(moved).logits, base, atol=1e-4)
    # ...but not to the index ablation, which never looks at timestamps.
    index_model = model_for(positions="index")
    ref = index_model(collate([clip(60, 36, 5)])).logits
    torch.testing.assert_close(index_model(moved).logits, ref)


def _empty_video(batch: Batch) -> Batch:
    b = len(batch)
    return Batch(
        audio=batch.audio,
        audio_times=batch.audio_times,
        audio_mask=batch.audio_mask,
        video=torch.zeros(b, 0, CROP, CROP, 3, dtype=torch.uint8),
        video_times=torch.zeros(b, 0),
        video_mask=torch.zeros(b, 0, dtype=torch.bool),
        labels=batch.labels,
        clip_ids=batch.clip_ids,
    )


@pytest.mark.parametrize("fusion", ["joint", "late"])
def test_missing_modalities_stay_finite(fusion: str) -> None:
    model = model_for(fusion=fusion).train()
    mixed = collate([clip(40, 24, 6), clip(40, 0, 7), clip(0, 24, 8), clip(30, 18, 9, face_every=10**6)])
    mixed.video_mask[3] = False  # a clip whose video never shows a face
    audio_only = _empty_video(collate([clip(40, 24, 10), clip(25, 10, 11)]))
    video_only = collate([clip(0, 24, 12), clip(0, 12, 13)])
    nothing = collate([clip(0, 0, 14)])
    for batch in (mixed, audio_only, video_only, nothing):
        model.zero_grad()
        out = model(batch)
        assert torch.isfinite(out.logits).all()
        out.logits.sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_bf16_autocast_runs_and_stays_close() -> None:
    model = model_for(audio_downsample=2)
    batch = collate([clip(50, 30, 15), clip(35, 20, 16, face_every=3)])
    ref = model(batch).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits.float(), ref, atol=0.15, rtol=0.1)


def test_inputs_checked_at_the_boundary() -> None:
    model = model_for()
    bad_mels = collate([clip(10, 5, 17)])
    bad_mels.audio = torch.randn(1, 10, N_MELS + 1)
    with pytest.raises(ValueError, match="17 mel channels"):
        model(bad_mels)
    bad_crop = collate([clip(10, 5, 18)])
    bad_crop.video = torch.zeros(1, 5, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        model(bad_crop)


def states_clip(ta: int, seed: int, layers: int = 3, width: int = 8) -> ClipExample:
    g = torch.Generator().manual_seed(seed)
    return ClipExample(
        audio=torch.randn(ta, layers, width, generator=g).to(torch.float16),
        audio_times=torch.arange(ta, dtype=torch.float32) * 0.02,
        video=torch.zeros(0, CROP, CROP, 3, dtype=torch.uint8),
        video_times=torch.zeros(0),
        face_mask=torch.zeros(0, dtype=torch.bool),
        label=seed % 3,
        clip_id=f"s{seed}",
    )


@pytest.mark.parametrize("pooling", ["mean", "attention", "stats"])
def test_encoder_states_model_ignores_padding_and_learns_a_layer_mix(pooling: str) -> None:
    model = model_for(audio_layers=3, audio_width=8, audio_downsample=2, pooling=pooling)
    alone = model(collate([states_clip(25, 1)])).logits
    padded = model(collate([states_clip(25, 1), states_clip(60, 2)])).logits[:1]
    assert torch.allclose(alone, padded, atol=1e-5)  # a clip's output does not depend on its batch
    weights = model.audio_frontend.layer_weights()
    assert weights.shape == (3,) and torch.allclose(weights.sum(), torch.tensor(1.0))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(collate([states_clip(25, 1), states_clip(40, 2)])).logits, torch.tensor([1, 2]))
    loss.backward()
    assert model.audio_frontend.layer_logits.grad is not None and model.audio_frontend.layer_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("downsample", [1, 2])
def test_concatenated_layers_feed_every_layer_to_the_projection(downsample: int) -> None:
    model = model_for(audio_layers=3, audio_width=8, audio_downsample=downsample, audio_layer_mix="concat", pooling="stats")
    frontend = model.audio_frontend
    assert frontend.proj[0].in_features == 3 * 8 and not hasattr(frontend, "layer_logits")
    with pytest.raises(ValueError, match="no layer weights"):
        frontend.layer_weights()
    alone = model(collate([states_clip(25, 1)])).logits
    padded = model(collate([states_clip(25, 1), states_clip(60, 2)])).logits[:1]
    assert torch.allclose(alone, padded, atol=1e-5)
    # Each layer reaches the output on its own: changing only the last layer changes the logits.
    clip = states_clip(25, 1)
    changed = dataclasses.replace(clip, audio=clip.audio.clone())
    changed.audio[:, -1] = torch.randn_like(changed.audio[:, -1])
    assert not torch.allclose(alone, model(collate([changed])).logits, atol=1e-4)
    with pytest.raises(ValueError, match="audio_layer_mix='sum'"):
        tiny_config(audio_layers=3, audio_width=8, audio_layer_mix="sum")
    with pytest.raises(ValueError, match="this store holds log-mel"):
        tiny_config(audio_layer_mix="concat")


@pytest.mark.parametrize("norm", ["mean", "mean-var"])
def test_utterance_normalised_states_lose_each_clips_static_offset(norm: str) -> None:
    """audio_utterance_norm: after the per-frame layer norm each layer's channels are centred (and scaled) on the clip's
    own valid frames, so a clip whose normalised states differ by a constant per channel gives the same logits."""
    model = model_for(audio_layers=3, audio_width=8, audio_downsample=2, audio_layer_mix="concat", audio_utterance_norm=norm)
    frontend = model.audio_frontend
    clip = states_clip(25, 1)
    alone = model(collate([clip])).logits
    padded = model(collate([clip, states_clip(60, 2)])).logits[:1]
    assert torch.allclose(alone, padded, atol=1e-5)  # padding frames never enter a clip's statistics
    x = torch.nn.functional.layer_norm(clip.audio.float(), (8,)).unsqueeze(0)  # (1, T, L, D) what the norm receives
    mask = torch.ones(1, 25, dtype=torch.bool)
    shifted = normalise_utterance(x + torch.randn(1, 1, 3, 8), mask, scale=norm == "mean-var")
    torch.testing.assert_close(shifted, normalise_utterance(x, mask, scale=norm == "mean-var"), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalise_utterance(x, mask, scale=False).mean(1), torch.zeros(1, 3, 8), atol=1e-5, rtol=0)
    assert frontend.utterance_norm == norm
    plain = model_for(audio_layers=3, audio_width=8, audio_downsample=2, audio_layer_mix="concat")
    plain.load_state_dict(model.state_dict())  # the same weights without the norm: another output
    assert not torch.allclose(alone, plain(collate([clip])).logits, atol=1e-4)
    with pytest.raises(ValueError, match="audio_utterance_norm='std'"):
        tiny_config(audio_layers=3, audio_width=8, audio_utterance_norm="std")
    with pytest.raises(ValueError, match="already normalise per utterance"):
        tiny_config(audio_utterance_norm="mean")


def test_encoder_states_of_the_wrong_shape_are_refused() -> None:
    model = model_for(audio_layers=3, audio_width=8)
    with pytest.raises(ValueError, match=r"\(2, 8\) per frame, the model expects \(3, 8\)"):
        model(collate([states_clip(10, 1, layers=2)]))
    with pytest.raises(ValueError, match="set both"):
        tiny_config(audio_layers=3)


def small_whisper(n_layers: int = 3, width: int = 16, heads: int = 2) -> WhisperEncoder:
    torch.manual_seed(3)
    encoder = WhisperEncoder(WhisperEncoderShape(n_mels=8, width=width, n_heads=heads, n_layers=n_layers))
    with torch.no_grad():
        encoder.positions.normal_()
    return encoder.eval()


def whisper_states_clip(encoder: WhisperEncoder, n_mel: int, seed: int) -> ClipExample:
    mel = torch.randn(1, 8, n_mel, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        states = torch.stack([s[0] for s in encoder(mel)], dim=1)  # (T, L, D), as the store keeps them
    example = states_clip(states.shape[0], seed, layers=states.shape[1], width=states.shape[2])
    example.audio = states.to(torch.float16)
    return example


def test_finetuned_top_blocks_start_as_the_pretrained_encoder_and_ignore_padding() -> None:
    encoder = small_whisper()
    model = model_for(audio_layers=4, audio_width=16, audio_heads=2, audio_finetune_blocks=2)
    model.audio_frontend.load_top_blocks(encoder)
    frontend = model.audio_frontend
    short, long = whisper_states_clip(encoder, 30, 1), whisper_states_clip(encoder, 70, 2)
    batch = collate([short, long])
    rerun = frontend._rerun_top(batch.audio.to(torch.float32), batch.audio_mask)  # (B, T, L, D)
    for i, clip in enumerate([short, long]):
        t = clip.audio.shape[0]
        # the re-run top states equal the encoder's own (up to the float16 store), padding never looked at
        assert torch.allclose(rerun[i, :t], clip.audio.to(torch.float32), atol=2e-2), (rerun[i, :t] - clip.audio.float()).abs().max()
    alone = model(collate([short])).logits
    assert torch.allclose(alone, model(batch).logits[:1], atol=1e-5)


def test_finetuned_blocks_train_at_the_scaled_learning_rate() -> None:
    from modeling.training.train_loop import TrainConfig, parameter_groups

    model = model_for(audio_layers=4, audio_width=16, audio_heads=2, audio_finetune_blocks=1)
    groups = parameter_groups(model, TrainConfig(lr=1e-3, encoder_lr_scale=0.1))
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.audio_frontend.pretrained_parameters()}
    model.train()
    batch = collate([states_clip(20, 1, layers=4, width=16), states_clip(30, 2, layers=4, width=16)])
    torch.nn.functional.cross_entropy(model(batch).logits, torch.tensor([1, 2])).backward()
    assert model.audio_frontend.top_blocks[0].qkv.weight.grad.abs().sum() > 0
    assert len(parameter_groups(model_for(audio_layers=4, audio_width=16), TrainConfig())) == 1  # frozen: one group


def test_finetuning_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="audio_finetune_blocks=4 needs"):
        tiny_config(audio_layers=4, audio_width=16, audio_heads=2, audio_finetune_blocks=4)
    with pytest.raises(ValueError, match="audio_heads=0"):
        MsataModel(tiny_config(audio_layers=4, audio_width=16, audio_finetune_blocks=1))
    model = model_for(audio_layers=4, audio_width=16, audio_heads=2, audio_finetune_blocks=1)
    with pytest.raises(ValueError, match="does not match a store of 4 hidden states"):
        model.audio_frontend.load_top_blocks(small_whisper(n_layers=2))


@pytest.mark.parametrize("kind", ["tarope", "index", "none"])
def test_the_model_rotates_q_and_k_at_the_chosen_positions(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attention layer of the joint model calls ``rotate`` with ``Rotary(rotary_positions(...))``."""
    seen: list = []

    def spy(x: torch.Tensor, rotation: Rotation | None) -> torch.Tensor:
        seen.append(rotation)
        return rotate(x, rotation)

    monkeypatch.setattr(encoder_module, "rotate", spy)
    model = model_for(positions=kind, rotary_rate=40.0)
    batch = collate([clip(20, 12, 1), clip(11, 7, 2, offset=0.3)])
    model(batch)
    assert len(seen) == 2 * model.config.n_layers  # q and k in every layer
    positions = rotary_positions(kind, [batch.audio_times, batch.video_times], 40.0)
    if kind == "tarope":
        torch.testing.assert_close(positions, torch.cat([batch.audio_times, batch.video_times], dim=1) * 40.0)
    expected = Rotary(model.config.head_dim, model.config.rotary_base)(positions)
    for rotation in seen:
        if expected is None:
            assert rotation is None
        else:
            torch.testing.assert_close(rotation.cos, expected.cos, rtol=0, atol=0)
            torch.testing.assert_close(rotation.sin, expected.sin, rtol=0, atol=0)


def test_state_dict_keys_unchanged_by_the_rotary() -> None:
    """Checkpoints written before the rotary was one module still load: the rotary holds no
    state, and an encoder block's keys are exactly these for every kind of positions."""
    expected = {
        f"encoder.blocks.0.{name}.{p}" for name in ("ln1", "attn.qkv", "attn.proj", "ln2", "mlp.0", "mlp.2") for p in ("weight", "bias")
    } | {"encoder.norm.weight", "encoder.norm.bias"}
    for kind in ("tarope", "index", "none"):
        keys = set(model_for(positions=kind, n_layers=1).state_dict())
        assert {k for k in keys if k.startswith("encoder.")} == expected, kind
        assert not [k for k in keys if "rotary" in k or "inv_freq" in k], kind
