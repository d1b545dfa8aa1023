"""A linear probe on pooled audio statistics, mixed into the model's output (``train.probe_weight``).

On RAVDESS with frozen Whisper states, a logistic regression on each clip's mean and
standard deviation of every stored state (the floor of docs/results.md) scores as well as the
trained transformer, and the two err on different folds. The probe is that regression, fitted
after training on the fold's training clips (``modeling.training.probe_fit``), and the shipped
model's class probabilities are the mixture

    "mean":      p = (1 - w) * softmax(model logits) + w * softmax(probe logits)
    "geometric": p = softmax((1 - w) * log softmax(model logits) + w * log softmax(probe logits))

with w fixed by the config (not tuned on validation; ``train.probe_mix`` picks the form). The
returned logits are ``log p`` (mean) or the weighted log-probabilities (geometric), so softmax,
argmax and cross-entropy downstream see the mixed distribution. The geometric form lets the member
that is sure of a class outvote one that is not only as far as its log-probability says, where the
mean of probabilities follows whichever member is more confident (session 11, docs/results.md).

The probe reads the same batch the model reads (a clip, or a window of it for the timeline),
so training, ``msata predict`` and the MLflow model compute identical inputs. Its tensors travel
in the checkpoint under :data:`CHECKPOINT_KEY`, not in the state dict, so checkpoints without a
probe load as before. Pure functions for the maths; the module only holds the fitted tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CHECKPOINT_KEY = "pooled_probe"
MIX_KINDS = ("mean", "geometric")


def pooled_statistics(audio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean and population std over each clip's valid frames, in float32.

    audio (B, T, F) log-mel or (B, T, L, D) encoder states, mask (B, T) -> (B, 2 * F') with
    F' = F or L * D: [means; stds], each frame flattened (layer-major for states, as the floor's
    "all layers" view). A clip without a valid frame gets zeros.
    """
    x = audio.to(torch.float32).flatten(2)  # (B, T, F')
    m = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    count = m.sum(dim=1).clamp_min(1.0)  # (B, 1)
    mean = (x * m).sum(dim=1) / count  # (B, F')
    var = ((x - mean.unsqueeze(1)).square() * m).sum(dim=1) / count  # (B, F')
    return torch.cat([mean, var.clamp_min(0.0).sqrt()], dim=-1)  # (B, 2F')


def mix_log_probs(model_logits: torch.Tensor, probe_logits: torch.Tensor, weight: float, kind: str = "mean") -> torch.Tensor:
    """(B, C) -> (B, C): log((1 - w) softmax(a) + w softmax(b)), computed stably ("mean"), or
    (1 - w) log softmax(a) + w log softmax(b) ("geometric", normalised by the softmax that reads it)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"probe weight {weight}; expected a value in [0, 1]")
    if kind not in MIX_KINDS:
        raise ValueError(f"probe mix {kind!r}; expected one of {MIX_KINDS}")
    a = torch.log_softmax(model_logits.to(torch.float32), dim=-1)
    b = torch.log_softmax(probe_logits.to(torch.float32), dim=-1)
    if weight == 0.0:
        return a
    if weight == 1.0:
        return b
    if kind == "geometric":
        return (1.0 - weight) * a + weight * b
    w = torch.tensor([1.0 - weight, weight], dtype=torch.float32, device=a.device).log()
    return torch.logsumexp(torch.stack([a + w[0], b + w[1]]), dim=0)


class PooledProbe(nn.Module):
    """Standardise the pooled statistics, then one linear layer: (B, 2F') -> (B, C) logits.

    Buffers are not persistent: the probe is saved by :meth:`to_checkpoint`, beside the state dict."""

    def __init__(
        self, center: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor, weight: float, mix: str = "mean"
    ) -> None:
        super().__init__()
        n_features = center.shape[-1]
        if scale.shape != (n_features,) or coef.ndim != 2 or coef.shape[1] != n_features or intercept.shape != (coef.shape[0],):
            raise ValueError(
                f"pooled probe shapes do not agree: center {tuple(center.shape)}, scale {tuple(scale.shape)}, "
                f"coef {tuple(coef.shape)}, intercept {tuple(intercept.shape)}"
            )
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"pooled probe weight {weight}; expected a value in (0, 1]")
        if mix not in MIX_KINDS:
            raise ValueError(f"pooled probe mix {mix!r}; expected one of {MIX_KINDS}")
        self.weight, self.mix_kind = float(weight), mix
        self.register_buffer("center", center.to(torch.float32), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32), persistent=False)
        self.register_buffer("coef", coef.to(torch.float32), persistent=False)
        self.register_buffer("intercept", intercept.to(torch.float32), persistent=False)

    @property
    def n_features(self) -> int:
        return int(self.center.shape[0])

    def forward(self, audio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.logits_of(pooled_statistics(audio, mask))

    def logits_of(self, statistics: torch.Tensor) -> torch.Tensor:
        """(B, 2F') pooled statistics, as :func:`pooled_statistics` makes them -> (B, C) logits."""
        x = statistics.to(device=self.center.device, dtype=torch.float32)
        if x.shape[-1] != self.n_features:
            raise ValueError(f"pooled probe fitted on {self.n_features} statistics per clip; this input gives {x.shape[-1]}")
        # float32 under bf16 autocast too: C was chosen for the float64 regression, 2 x L x D terms per logit
        with torch.autocast(device_type=x.device.type, enabled=False):
            return ((x - self.center) / self.scale) @ self.coef.T + self.intercept  # (B, C)

    def mix(self, model_logits: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mixture's log-probabilities (B, C); a row without any audio frame (a video-only clip or
        timeline window) keeps the model's own: its statistics would be zeros the probe never saw."""
        mixed = mix_log_probs(model_logits, self(audio, mask), self.weight, self.mix_kind)
        has_audio = mask.any(dim=1, keepdim=True)  # (B, 1)
        return torch.where(has_audio, mixed, torch.log_softmax(model_logits.to(torch.float32), dim=-1))

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "center": self.center.cpu(),
            "scale": self.scale.cpu(),
            "coef": self.coef.cpu(),
            "intercept": self.intercept.cpu(),
            "weight": self.weight,
            "mix": self.mix_kind,
        }

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any], source: str = "") -> PooledProbe:
        missing = [k for k in ("center", "scale", "coef", "intercept", "weight") if k not in data]
        if missing:
            raise ValueError(f"checkpoint {source}: its {CHECKPOINT_KEY} lacks {missing}")
        # "mix" is absent from probes saved before train.probe_mix existed: they mixed by the mean
        return cls(data["center"], data["scale"], data["coef"], data["intercept"], float(data["weight"]), str(data.get("mix", "mean")))
