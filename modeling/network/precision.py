"""The one precision policy of the model, for training and inference alike."""

from __future__ import annotations

import torch


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (no loss scaling needed); CPU stays in fp32 (CPU bf16 is slow and lossy here).

    The rotary maths run in float32 inside it (``modeling.network.tarope.rotate``)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
