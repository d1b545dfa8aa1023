"""A seed ensemble: models of one recipe trained from different seeds, their class probabilities averaged.

``train.members = N`` (``modeling/training/members.py``) trains a fold's recipe N times and ships
one checkpoint holding every member's weights; :func:`modeling.training.checkpoint.model_from_checkpoint`
builds a :class:`MemberEnsemble` from it. It answers like one :class:`~modeling.network.encoder.MsataModel`
(``forward(batch) -> ModelOutput``, ``config``, ``attach_probe``), so validation, testing, ``msata predict``
and the MLflow pyfunc read it unchanged.

Its ``logits`` are the log of the members' mean class probabilities,

    log p(c | x) = log (1/N) sum_k softmax(z_k(x))_c,

which argmax, softmax and cross-entropy downstream read as that mean. A pooled probe
(``train.probe_weight``) is fitted once per fold and mixed into the ensemble's output, as it is into
one model's. The other outputs (pooled features, tokens) are the first member's: only training
losses read them, and an ensemble is never trained as one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from modeling.network.batch import Batch
from modeling.network.encoder import ModelOutput, MsataModel
from modeling.network.pooled_probe import PooledProbe


def mean_probability_log(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of softmax(z_k) over the members, (B, C) float32, computed in log space (no underflow)."""
    if not logits:
        raise ValueError("an ensemble needs at least one member's logits")
    log_probs = torch.stack([torch.log_softmax(z.to(torch.float32), dim=-1) for z in logits])  # (N, B, C)
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


class MemberEnsemble(nn.Module):
    def __init__(self, members: Sequence[MsataModel]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        first = members[0].config
        for k, member in enumerate(members[1:], start=1):
            if member.config != first:
                raise ValueError(f"ensemble member {k} has another model config than member 0: members are one recipe")
            if member.pooled_probe is not None:
                raise ValueError(f"ensemble member {k} carries a pooled probe: the probe belongs to the ensemble")
        self.members = nn.ModuleList(members)
        self.config = first
        self.pooled_probe: PooledProbe | None = None

    def attach_probe(self, probe: PooledProbe | None) -> None:
        if probe is not None and "audio" not in self.config.modalities:
            raise ValueError("a pooled audio probe needs a model that reads audio")
        self.pooled_probe = probe

    def forward(self, batch: Batch) -> ModelOutput:
        outputs = [member(batch) for member in self.members]
        logits = mean_probability_log([o.logits for o in outputs])  # (B, C)
        if self.pooled_probe is not None:  # the probe reads the clip's audio, as MsataModel.forward does
            logits = self.pooled_probe.mix(logits, batch.audio, batch.audio_mask)
        return replace(outputs[0], logits=logits)
