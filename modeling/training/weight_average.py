"""An exponential moving average of a model's weights (``train.ema_decay``), like timm's ModelEma (the whole state dict).

Why: on ~1,000 training clips of a few speakers the weights after any one step are noisy;
validation UAR moved by 0.05-0.1 from one epoch to the next in the frozen Whisper-base runs
(session 8), so choosing the best epoch chose a noisy peak. The average of the recent steps'
weights is a smoother model; it is the one validated, chosen, tested and shipped, while the
optimiser keeps stepping the raw weights.

The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates (the
``num_updates`` rule of TensorFlow's ExponentialMovingAverage), so the randomly initialised
weights of the first steps do not linger in the average.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """The average of every floating-point entry of ``model.state_dict()`` (buffers too, such as
    BatchNorm statistics); integer entries (step counters) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay}: expected 0 < decay < 1 (0 turns the average off)")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for name, value in model.state_dict().items():
            avg = self.shadow[name]
            if avg.is_floating_point():
                avg.mul_(d).add_(value.detach().to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(value)
        self.updates += 1

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """The averaged weights in ``model`` for the block (validation, a checkpoint), which is given a copy
        of the raw ones (a checkpoint keeps them to resume); the raw ones are back in ``model`` after."""
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield raw
        finally:
            model.load_state_dict(raw)

    def restore(self, averaged: dict[str, torch.Tensor], updates: int, device: torch.device | str = "cpu") -> None:
        """Resume: the averaged weights (a checkpoint's ``state_dict``) and how many updates made them."""
        self.updates = int(updates)
        self.shadow = {k: v.detach().to(device).clone() for k, v in averaged.items()}
