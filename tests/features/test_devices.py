"""Which device a preprocessing worker uses (features/devices.py): the spelling, the spreading
of local Dask workers over a host's GPUs (pure, so tested without GPUs), and a real local
Dask cluster's workers reporting their index."""

from __future__ import annotations

import pytest

from features.devices import check_device_spelling, local_worker_index, resolve_device, worker_device


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_spellings_that_are_accepted(device: str) -> None:
    assert check_device_spelling(device) == device


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "mps", "", " cpu"])
def test_other_spellings_name_the_value(device: str) -> None:
    with pytest.raises(ValueError, match=f"device must be auto, cpu, cuda or cuda:N, got {device!r}"):
        check_device_spelling(device)


@pytest.mark.parametrize(
    ("device", "cuda_count", "worker_index", "expected"),
    [
        ("auto", 0, None, "cpu"),
        ("auto", 0, 3, "cpu"),
        ("cpu", 4, 1, "cpu"),
        ("auto", 1, None, "cuda:0"),
        ("auto", 2, 0, "cuda:0"),
        ("auto", 2, 1, "cuda:1"),
        ("auto", 2, 2, "cuda:0"),  # more workers than GPUs: round robin
        ("cuda", 4, 3, "cuda:3"),
        ("cuda", 4, None, "cuda:0"),  # one process, or a remote worker with its own CUDA_VISIBLE_DEVICES
        ("cuda:1", 2, 0, "cuda:1"),  # an explicit GPU is never moved
    ],
)
def test_resolution(device: str, cuda_count: int, worker_index: int | None, expected: str) -> None:
    assert resolve_device(device, cuda_count, worker_index) == expected


def test_a_gpu_asked_for_where_there_is_none_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"device='cuda' asks for a GPU, but this worker sees no CUDA device"):
        resolve_device("cuda", 0)
    with pytest.raises(ValueError, match=r"device='cuda:2': this worker sees 2 CUDA device\(s\), numbered 0 to 1"):
        resolve_device("cuda:2", 2)


def test_this_process_is_not_a_dask_worker() -> None:
    import torch

    assert local_worker_index() is None
    assert worker_device("cpu") == "cpu"
    assert worker_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_local_dask_workers_report_their_index() -> None:
    """LocalCluster names its worker processes 0, 1, ...: each one finds its own index, which
    is what spreads ``auto`` over a host's GPUs (flows/runners.py starts such a cluster for --workers N)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        addresses = sorted(client.scheduler_info()["workers"])
        # As tasks, as Prefect's DaskTaskRunner runs the clip tasks (get_worker() works inside a task).
        found = {a: client.submit(local_worker_index, workers=[a], pure=False).result() for a in addresses}
        devices = {a: client.submit(worker_device, "auto", workers=[a], pure=False).result() for a in addresses}
    assert sorted(found.values()) == [0, 1], found
    import torch

    if not torch.cuda.is_available():
        assert set(devices.values()) == {"cpu"}
