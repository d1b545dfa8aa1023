from __future__ import annotations

import math

import pytest
import torch

from modeling.network.batch import ClipExample, collate
from modeling.network.encoder import MsataConfig, MsataModel
from modeling.network.losses import ctm_loss, ctm_loss_from_output, training_objective


def tiny_model() -> MsataModel:
    torch.manual_seed(0)
    return MsataModel(
        MsataConfig(n_classes=3, n_mels=8, d_model=32, n_heads=2, n_layers=1, dropout=0.0, crop_size=16, video_channels=(8, 16), ctm_dim=16)
    )


def clip(ta: int, tv: int, label: int) -> ClipExample:
    return ClipExample(
        audio=torch.randn(ta, 8),
        audio_times=torch.arange(ta) / 50.0,
        video=torch.randint(0, 256, (tv, 16, 16, 3), dtype=torch.uint8),
        video_times=torch.arange(tv) / 30.0,
        face_mask=torch.ones(tv, dtype=torch.bool),
        label=label,
        clip_id=f"c{label}",
    )


def timeline_features(times: torch.Tensor, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Features that are a smooth random function of time: equal at equal instants."""
    g = torch.Generator().manual_seed(seed)
    freqs = torch.rand(dim, generator=g) * 20 + 2  # rad/s
    phases = torch.rand(dim, generator=g) * 2 * math.pi
    return torch.sin(times.unsqueeze(-1) * freqs + phases)  # (B, T, dim)


def aligned_pair(ta: int = 100, tv: int = 60) -> dict[str, torch.Tensor]:
    at = (torch.arange(ta, dtype=torch.float32) / 50).unsqueeze(0)
    vt = (torch.arange(tv, dtype=torch.float32) / 30).unsqueeze(0)
    return dict(
        audio_tokens=timeline_features(at),
        audio_times=at,
        audio_mask=torch.ones(1, ta, dtype=torch.bool),
        video_tokens=timeline_features(vt),
        video_times=vt,
        video_mask=torch.ones(1, tv, dtype=torch.bool),
    )


def test_aligned_features_score_lower_than_time_shuffled() -> None:
    pair = aligned_pair()
    aligned = ctm_loss(**pair)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    shuffled = ctm_loss(**{**pair, "video_tokens": pair["video_tokens"][:, perm]})
    assert torch.isfinite(aligned) and aligned < shuffled - 0.5


def test_directions_are_symmetric() -> None:
    pair = aligned_pair()
    swapped = dict(
        audio_tokens=pair["video_tokens"],
        audio_times=pair["video_times"],
        audio_mask=pair["video_mask"],
        video_tokens=pair["audio_tokens"],
        video_times=pair["audio_times"],
        video_mask=pair["audio_mask"],
    )
    torch.testing.assert_close(ctm_loss(**swapped), ctm_loss(**pair))


def test_matches_a_direct_computation_and_skips_far_audio_in_a2v() -> None:
    torch.manual_seed(0)
    a, v = torch.randn(1, 4, 4), torch.randn(1, 2, 4)
    # The 4th audio token is 0.9 s from any video frame: no a->v term, but still a
    # negative in the v->a softmax.
    at, vt = torch.tensor([[0.0, 0.02, 0.04, 1.0]]), torch.tensor([[0.0, 0.0333]])
    sigma, tau = 1 / 30, 0.2
    an, vn = a[0] / a[0].norm(dim=-1, keepdim=True), v[0] / v[0].norm(dim=-1, keepdim=True)
    cos = an @ vn.T  # (4, 2)
    w = torch.exp(-((at[0, :, None] - vt[0, None, :]) ** 2) / (2 * sigma**2))
    a2v = -(w / w.sum(1, keepdim=True) * torch.log_softmax(cos / tau, dim=1)).sum(1)[:3].mean()
    v2a = -(w / w.sum(0, keepdim=True) * torch.log_softmax(cos / tau, dim=0)).sum(0).mean()
    ones = lambda n: torch.ones(1, n, dtype=torch.bool)  # noqa: E731
    got = ctm_loss(a, at, ones(4), v, vt, ones(2), sigma=sigma, tau=tau)
    torch.testing.assert_close(got, 0.5 * (a2v + v2a))
    # With the far-token rule switched off, the 4th token's a->v term (pinned to the
    # nearest frame) is counted too.
    p_far = torch.softmax(-((at[0, :, None] - vt[0, None, :]) ** 2) / (2 * sigma**2), dim=1)  # w underflows
    a2v_all = -(p_far * torch.log_softmax(cos / tau, dim=1)).sum(1).mean()
    got_all = ctm_loss(a, at, ones(4), v, vt, ones(2), sigma=sigma, tau=tau, max_offset_sigmas=float("inf"))
    torch.testing.assert_close(got_all, 0.5 * (a2v_all + v2a))


def test_no_gradient_reaches_padded_or_faceless_tokens() -> None:
    pair = aligned_pair(40, 24)
    a = pair["audio_tokens"].clone().requires_grad_(True)
    v = pair["video_tokens"].clone().requires_grad_(True)
    amask, vmask = pair["audio_mask"].clone(), pair["video_mask"].clone()
    amask[0, 30:] = False  # padding
    vmask[0, 5:8] = False  # frames without a face
    head = torch.nn.Linear(32, 8)
    loss = ctm_loss(a, pair["audio_times"], amask, v, pair["video_times"], vmask, projector=head)
    loss.backward()
    assert a.grad[0, 30:].abs().max() == 0 and a.grad[0, :30].abs().max() > 0
    assert v.grad[0, 5:8].abs().max() == 0 and v.grad[0, :5].abs().max() > 0


def test_missing_modality_contributes_nothing_and_no_pair_gives_zero() -> None:
    pair = aligned_pair(40, 24)
    # Batch of two: clip 0 complete, clip 1 without faces -> equals clip 0 alone.
    two = {k: torch.cat([val, val], dim=0) for k, val in pair.items()}
    two["video_mask"] = two["video_mask"].clone()
    two["video_mask"][1] = False
    torch.testing.assert_close(ctm_loss(**two), ctm_loss(**pair))

    a = pair["audio_tokens"].clone().requires_grad_(True)
    no_video = ctm_loss(
        a, pair["audio_times"], pair["audio_mask"], torch.zeros(1, 0, 32), torch.zeros(1, 0), torch.zeros(1, 0, dtype=torch.bool)
    )
    assert no_video.item() == 0.0 and no_video.requires_grad
    no_video.backward()
    assert a.grad is not None and a.grad.abs().max() == 0


def test_training_objective_on_model_output() -> None:
    model = tiny_model()
    batch = collate([clip(50, 30, 0), clip(50, 0, 1), clip(0, 30, 2)])
    out = model(batch)
    parts = training_objective(out, batch.labels, lambda_ctm=0.5, projector=model.ctm_head)
    torch.testing.assert_close(parts.total, parts.ce + 0.5 * parts.ctm)
    torch.testing.assert_close(parts.ctm, ctm_loss_from_output(out, projector=model.ctm_head))
    assert parts.ctm > 0 and set(parts.as_floats()) == {"loss", "ce", "ctm"}
    parts.total.backward()
    assert model.ctm_head.weight.grad is not None and model.ctm_head.weight.grad.abs().max() > 0
    only_ce = training_objective(model(batch), batch.labels)
    assert only_ce.ctm.item() == 0.0
    with pytest.raises(ValueError, match="labelled"):
        training_objective(out, torch.full((3,), -1))


@pytest.mark.parametrize("ctm_on", ["frontend", "encoder"])
def test_ctm_form_decides_which_weights_it_trains(ctm_on: str) -> None:
    """Front-end CTM reaches the front-ends and its head, never the encoder or classifier (it cannot be
    met through attention); the first form, on the encoder outputs, reaches the encoder."""
    torch.manual_seed(0)
    model = MsataModel(
        MsataConfig(
            n_classes=3,
            n_mels=8,
            d_model=32,
            n_heads=2,
            n_layers=1,
            dropout=0.0,
            crop_size=16,
            video_channels=(8, 16),
            ctm_dim=16,
            ctm_on=ctm_on,
        )
    )
    batch = collate([clip(50, 30, 0), clip(40, 25, 1)])
    out = model(batch)
    assert (out.ctm_audio is not None) == (ctm_on == "frontend")
    ctm_loss_from_output(out, projector=model.ctm_head).backward()
    reached = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert {"audio_frontend", "video_frontend", "ctm_head"} <= reached
    assert ("encoder" in reached) == (ctm_on == "encoder")
    assert "classifier" not in reached and ("modality" in reached) == (ctm_on == "encoder")


def test_ctm_form_is_checked_and_default_is_frontend() -> None:
    assert MsataConfig().ctm_on == "frontend"
    with pytest.raises(ValueError, match="ctm_on='joint'"):
        MsataConfig(ctm_on="joint")


def test_bf16_tokens_from_an_autocast_region_meet_a_float32_projector() -> None:
    """On CUDA the model runs under bf16 autocast and the loss outside it: the projector (float32
    weights) gets bf16 tokens. The loss is computed in float32 and equals the float32 one closely."""
    pair = aligned_pair()
    torch.manual_seed(0)
    projector = torch.nn.Linear(32, 16)
    reference = ctm_loss(**pair, projector=projector)
    half = {k: v.to(torch.bfloat16) if k.endswith("tokens") else v for k, v in pair.items()}
    loss = ctm_loss(**half, projector=projector)
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(float(reference), rel=0.02)
