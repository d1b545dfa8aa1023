"""Which device a preprocessing worker runs MTCNN and the audio encoder on.

``device`` is an execution choice, like the number of workers: it is not part of the
feature config or its hash. MTCNN's frames are already batched (``FaceDetector``, 32 per
call) and the encoder runs whole windows, so both use a GPU without further change.

Spelling (``msata preprocess --device``, the flow's ``device`` parameter):

* ``auto`` (default): CUDA when this worker sees a GPU, else the CPU;
* ``cpu``;
* ``cuda``: a GPU, an error when the worker has none;
* ``cuda:N``: that GPU.

Several workers on one host share its GPUs: a local Dask worker named ``k`` (LocalCluster
names its workers 0, 1, ...) takes GPU ``k mod n``, so two workers on a two-GPU host use one
each instead of both using GPU 0. A worker with any other name (a remote ``dask worker``)
takes the first GPU it sees: give each such worker its own GPU with CUDA_VISIBLE_DEVICES, as
dask-cuda does.
"""

from __future__ import annotations

import re
import sys

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def check_device_spelling(device: str) -> str:
    """``device`` if it is one of DEVICE_CHOICES, else a ValueError naming it."""
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or _CUDA_INDEX.fullmatch(device)):
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {device!r}")
    return device


def resolve_device(device: str, cuda_count: int, worker_index: int | None = None) -> str:
    """The torch device string for ``device`` on a worker that sees ``cuda_count`` GPUs.

    ``worker_index``: this process's index among the local Dask workers (None outside a
    local cluster); it spreads ``auto`` and ``cuda`` over the host's GPUs. Pure, so the
    spreading is tested without GPUs.
    """
    check_device_spelling(device)
    if device == "cpu" or (device == "auto" and cuda_count == 0):
        return "cpu"
    if cuda_count == 0:
        raise ValueError(f"device={device!r} asks for a GPU, but this worker sees no CUDA device (torch.cuda.device_count() == 0)")
    match = _CUDA_INDEX.fullmatch(device)
    if match:
        index = int(match.group(1))
        if index >= cuda_count:
            raise ValueError(f"device={device!r}: this worker sees {cuda_count} CUDA device(s), numbered 0 to {cuda_count - 1}")
        return device
    return f"cuda:{(worker_index or 0) % cuda_count}"


def local_worker_index() -> int | None:
    """This process's index among a local Dask cluster's workers, or None (not a Dask worker,
    or a worker whose name is not a number, such as a remote ``dask worker``)."""
    if "distributed" not in sys.modules:  # a Dask worker has imported it; a thread runner need not pay the import
        return None
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # distributed raises ValueError outside a worker
        return None
    if isinstance(name, int):
        return name
    if isinstance(name, str) and name.isdigit():
        return int(name)
    return None


def worker_device(device: str) -> str:
    """``resolve_device`` for the calling process: its GPUs and, on a local Dask worker, its index."""
    import torch

    return resolve_device(device, torch.cuda.device_count() if torch.cuda.is_available() else 0, local_worker_index())
