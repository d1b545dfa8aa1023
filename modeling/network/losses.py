"""Cross-temporal matching (CTM) loss and the training objective.

CTM asks the encoder's audio token at time t_i and video token at time s_j to
agree when |t_i - s_j| is small. After a projection head and L2 normalisation,

    w_ij = exp(-(t_i - s_j)^2 / (2 sigma^2))                 over valid pairs
    p(j | i) = w_ij / sum_j' w_ij'     q(j | i) = softmax_j(cos(a_i, v_j) / tau)
    L_a->v = mean over counted audio tokens i of  -sum_j p(j|i) log q(j|i)
    L_v->a = the same with the roles swapped (normalised over audio tokens)
    L_ctm  = (L_a->v + L_v->a) / 2

A token is counted only when it is valid and at least one valid token of the
other modality lies within ``max_offset_sigmas * sigma`` of it; otherwise its
targets would be pinned to some far-away frame (e.g. across a run of frames
without a face). Means are over counted tokens of the whole batch, so a clip
without one modality simply contributes nothing, and a batch without any pair
returns an exact 0 that is still connected to the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modeling.network.encoder import ModelOutput

DEFAULT_SIGMA = 1.0 / 30.0  # seconds: one frame at 30 fps
DEFAULT_TAU = 0.1
DEFAULT_MAX_OFFSET_SIGMAS = 3.0
_NEG = -1e9  # finite "minus infinity": keeps 0 * log q finite in the masked entries
# How the CTM weight moves over a run: "constant" = lambda_ctm at every step; "cosine" = lambda_ctm at
# step 0 decaying to 0 at the run's end (CTM helps while CE is on its plateau; CE finishes alone).
CTM_SCHEDULES = ("constant", "cosine")


def _soft_cross_entropy(logits: torch.Tensor, log_weights: torch.Tensor, pair: torch.Tensor, dim: int) -> torch.Tensor:
    """-sum p log q along ``dim``, p = softmax(log_weights), q = softmax(logits), both over valid pairs.

    logits, log_weights (B, Ta, Tv) float32, pair (B, Ta, Tv) bool -> (B, Ta) or (B, Tv).
    """
    log_q = torch.log_softmax(logits.masked_fill(~pair, _NEG), dim=dim)
    p = torch.softmax(log_weights.masked_fill(~pair, _NEG), dim=dim)
    return -torch.where(pair, p * log_q, torch.zeros_like(log_q)).sum(dim=dim)


def _masked_mean(values: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    return torch.where(counted, values, torch.zeros_like(values)).sum() / counted.sum().clamp_min(1)


def ctm_loss(
    audio_tokens: torch.Tensor,
    audio_times: torch.Tensor,
    audio_mask: torch.Tensor,
    video_tokens: torch.Tensor,
    video_times: torch.Tensor,
    video_mask: torch.Tensor,
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sigma: float = DEFAULT_SIGMA,
    tau: float = DEFAULT_TAU,
    max_offset_sigmas: float = DEFAULT_MAX_OFFSET_SIGMAS,
) -> torch.Tensor:
    """Symmetric cross-temporal matching loss (scalar, float32).

    audio_tokens (B, Ta, D), audio_times/audio_mask (B, Ta); video likewise with Tv.
    ``projector`` (e.g. ``model.ctm_head``) is applied before L2 normalisation.
    """
    if sigma <= 0 or tau <= 0:
        raise ValueError(f"sigma and tau must be positive, got sigma={sigma}, tau={tau}")
    # float32 from here: the tokens may come out of a bf16 autocast region, the loss is computed outside it
    audio_tokens, video_tokens = audio_tokens.to(torch.float32), video_tokens.to(torch.float32)
    if projector is not None:
        audio_tokens, video_tokens = projector(audio_tokens), projector(video_tokens)
    a = F.normalize(audio_tokens, dim=-1)  # (B, Ta, P)
    v = F.normalize(video_tokens, dim=-1)  # (B, Tv, P)
    logits = a @ v.transpose(1, 2) / tau  # (B, Ta, Tv)

    offset2 = (audio_times.to(torch.float32)[:, :, None] - video_times.to(torch.float32)[:, None, :]).square()
    log_weights = -offset2 / (2.0 * sigma**2)  # (B, Ta, Tv), softmax of this = normalised Gaussian
    pair = audio_mask[:, :, None] & video_mask[:, None, :]  # (B, Ta, Tv)
    near = pair & (offset2 <= (max_offset_sigmas * sigma) ** 2)

    a2v = _soft_cross_entropy(logits, log_weights, pair, dim=2)  # (B, Ta)
    v2a = _soft_cross_entropy(logits, log_weights, pair, dim=1)  # (B, Tv)
    return 0.5 * (_masked_mean(a2v, near.any(dim=2)) + _masked_mean(v2a, near.any(dim=1)))


def ctm_loss_from_output(
    output: ModelOutput,
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sigma: float = DEFAULT_SIGMA,
    tau: float = DEFAULT_TAU,
    max_offset_sigmas: float = DEFAULT_MAX_OFFSET_SIGMAS,
) -> torch.Tensor:
    """CTM on the tokens the model chose (``MsataConfig.ctm_on``): front-end tokens when the
    output carries them, else the encoder outputs."""
    audio = output.ctm_audio if output.ctm_audio is not None else output.audio_tokens
    video = output.ctm_video if output.ctm_video is not None else output.video_tokens
    return ctm_loss(
        audio,
        output.audio_times,
        output.audio_mask,
        video,
        output.video_times,
        output.video_mask,
        projector=projector,
        sigma=sigma,
        tau=tau,
        max_offset_sigmas=max_offset_sigmas,
    )


def ctm_weight(lambda_ctm: float, schedule: str, step: int, total_steps: int) -> float:
    """The CTM weight at optimiser step ``step`` (0-based) of a run of ``total_steps`` steps.

    "constant": ``lambda_ctm``. "cosine": ``lambda_ctm * (1 + cos(pi * step / total_steps)) / 2``, the peak at
    step 0 (no warm-up: the help is wanted during CE's plateau at the start), half at the middle, 0 at
    ``total_steps`` (steps past it stay at 0, e.g. an epoch count larger than the schedule's horizon).
    """
    if schedule not in CTM_SCHEDULES:
        raise ValueError(f"unknown CTM schedule {schedule!r}; expected one of {CTM_SCHEDULES}")
    if schedule == "constant":
        return lambda_ctm
    if total_steps <= 0 or step < 0:
        raise ValueError(f"a cosine CTM schedule needs step >= 0 and total_steps > 0, got step={step}, total_steps={total_steps}")
    return lambda_ctm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps)))


@dataclass
class ObjectiveParts:
    total: torch.Tensor  # scalar, what to backpropagate
    ce: torch.Tensor  # scalar classification cross-entropy
    ctm: torch.Tensor  # scalar CTM loss (0 when lambda_ctm == 0: not computed)

    def as_floats(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "ce": float(self.ce.detach()), "ctm": float(self.ctm.detach())}


def training_objective(
    output: ModelOutput,
    labels: torch.Tensor,
    lambda_ctm: float = 0.0,
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sigma: float = DEFAULT_SIGMA,
    tau: float = DEFAULT_TAU,
    label_smoothing: float = 0.0,
) -> ObjectiveParts:
    """CE(logits, labels) + lambda_ctm * CTM. Labels of -1 (unknown) are ignored by CE."""
    if not bool((labels >= 0).any()):
        raise ValueError(f"training_objective needs at least one labelled example, got labels {labels.tolist()}")
    ce = F.cross_entropy(output.logits.to(torch.float32), labels, ignore_index=-1, label_smoothing=label_smoothing)
    if lambda_ctm > 0:
        ctm = ctm_loss_from_output(output, projector=projector, sigma=sigma, tau=tau)
    else:
        ctm = ce.new_zeros(())
    return ObjectiveParts(total=ce + lambda_ctm * ctm, ce=ce, ctm=ctm)
