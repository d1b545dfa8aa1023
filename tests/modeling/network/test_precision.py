from __future__ import annotations

import torch

from modeling.network import precision


def test_one_autocast_for_training_and_inference() -> None:
    from modeling.inference import predictor
    from modeling.training import train_loop

    assert train_loop.autocast is precision.autocast and predictor.autocast is precision.autocast
    with precision.autocast(torch.device("cpu")):  # CPU stays in fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    context = precision.autocast(torch.device("cpu"))
    assert context.fast_dtype == torch.bfloat16  # what CUDA gets
