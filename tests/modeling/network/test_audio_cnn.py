"""The 2-D CNN log-mel front-end (MsataConfig.audio_frontend = "cnn2d")."""

from __future__ import annotations

import pytest
import torch

from modeling.network.batch import collate
from modeling.network.encoder import MsataConfig, MsataModel
from modeling.network.frontends import ConvAudioFrontend, merge_times
from tests.modeling.network.test_encoder import N_MELS, clip, tiny_config


def frontend(downsample: int = 4) -> ConvAudioFrontend:
    torch.manual_seed(0)
    return ConvAudioFrontend(N_MELS, d_model=24, downsample=downsample, dropout=0.0, channels=(4, 8, 8)).eval()


@pytest.mark.parametrize("downsample", [1, 2, 4, 8])
def test_tokens_pool_time_by_the_downsample_and_keep_the_frames_mean_time(downsample: int) -> None:
    ta = 40
    logmel = torch.randn(2, ta, N_MELS)
    times = (torch.arange(ta, dtype=torch.float32) / 50 + 0.01).expand(2, ta)
    mask = torch.ones(2, ta, dtype=torch.bool)
    tokens = frontend(downsample)(logmel, times, mask)
    assert tokens.x.shape == (2, ta // downsample, 24)
    expected_times, _ = merge_times(times, mask, downsample)
    torch.testing.assert_close(tokens.times, expected_times)
    assert tokens.mask.all()


def test_padding_changes_no_real_token() -> None:
    """A clip of 37 frames alone and padded to 52 in a batch gives the same tokens where they are valid."""
    net = frontend(4)
    g = torch.Generator().manual_seed(1)
    short = torch.randn(1, 37, N_MELS, generator=g)
    times = torch.arange(52, dtype=torch.float32)[None] / 50
    alone = net(short, times[:, :37], torch.ones(1, 37, dtype=torch.bool))
    padded_x = torch.cat([short, torch.randn(1, 15, N_MELS, generator=g) * 100], dim=1)  # garbage in the padding
    mask = torch.zeros(1, 52, dtype=torch.bool)
    mask[:, :37] = True
    padded = net(padded_x, times, mask)
    n = alone.x.shape[1]  # ceil(37 / 4) = 10 valid tokens
    assert n == 10 and padded.mask[0].sum() == n and not padded.mask[0, n:].any()
    torch.testing.assert_close(padded.x[:, :n], alone.x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.times[:, :n], alone.times)


def test_an_empty_clip_gives_no_tokens_and_a_wrong_mel_count_is_refused() -> None:
    net = frontend(4)
    empty = net(torch.zeros(2, 0, N_MELS), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool))
    assert empty.x.shape == (2, 0, 24)
    with pytest.raises(ValueError, match="mel channels"):
        net(torch.zeros(1, 8, N_MELS + 1), torch.zeros(1, 8), torch.ones(1, 8, dtype=torch.bool))


def test_config_checks_and_round_trip() -> None:
    cfg = tiny_config(audio_frontend="cnn2d", audio_channels=[4, 8], audio_downsample=4)
    assert cfg.audio_channels == (4, 8) and cfg.to_dict()["audio_channels"] == [4, 8]
    assert MsataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="audio_frontend"):
        tiny_config(audio_frontend="cnn3d")
    with pytest.raises(ValueError, match="log-mel"):
        tiny_config(audio_frontend="cnn2d", audio_layers=3, audio_width=8)
    with pytest.raises(ValueError, match="power of 2"):
        tiny_config(audio_frontend="cnn2d", audio_channels=[4, 8], audio_downsample=8)


def test_the_model_trains_through_the_cnn_front_end() -> None:
    torch.manual_seed(0)
    model = MsataModel(tiny_config(audio_frontend="cnn2d", audio_channels=[4, 8], audio_downsample=4, modalities=["audio"]))
    batch = collate([clip(50, 30, seed=0), clip(37, 22, seed=1)])
    out = model(batch)
    assert out.logits.shape == (2, 3)
    assert out.audio_times.shape == (2, 13)  # ceil(50 / 4) tokens at 12.5/s
    out.logits.logsumexp(-1).sum().backward()
    assert model.audio_frontend.stages[0][0].weight.grad.abs().sum() > 0


def test_a_model_without_blocks_pools_the_front_end_tokens() -> None:
    """n_layers = 0: the pooled head (front-end tokens -> final norm -> pooling -> classifier)."""
    torch.manual_seed(0)
    model = MsataModel(tiny_config(n_layers=0, pooling="stats", modalities=["audio"])).eval()
    assert len(model.encoder.blocks) == 0
    batch = collate([clip(50, 30, seed=0), clip(37, 22, seed=1)])
    out = model(batch)
    assert out.logits.shape == (2, 3) and out.pooled.shape == (2, 64)
    with pytest.raises(ValueError, match="invalid sizes"):
        tiny_config(n_layers=-1)
