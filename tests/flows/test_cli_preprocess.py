"""`msata preprocess` as a user runs it: a subprocess, on Dask workers, against real servers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from flow_servers import MSATA, REPO, clean_env, start_dask_cluster, start_prefect_server, stop_all

from features.synthetic import make_synthetic_dataset
from storage import FeatureStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("raw"), n_speakers=2, clips_per_class=1, classes=("happy", "sad"), duration_s=1.0, size=(160, 120)
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    """A real Prefect server and a Dask scheduler with two worker processes, all on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("servers")
    started: list[subprocess.Popen] = []
    try:
        env = start_prefect_server(tmp, started)
        address = start_dask_cluster(tmp, env, started, n_workers=2)
        yield env, address, tmp
    finally:
        stop_all(started)


def run_cli(env: dict[str, str], *args: str, timeout: int = 480) -> subprocess.CompletedProcess:
    return subprocess.run([MSATA, *args], env=env | {"COLUMNS": "200"}, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_cli_preprocess_on_an_external_dask_cluster(servers, small_dataset: Path, tmp_path: Path) -> None:
    env, address, server_tmp = servers
    store = tmp_path / "store"
    done = run_cli(env, "preprocess", "--dataset", "folder", "--root", str(small_dataset), "--store", str(store), "--dask-address", address)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 done" in done.stdout, done.stdout
    assert "pickle" not in done.stdout + done.stderr
    assert len(FeatureStore.open(store).clip_ids()) == 4
    # The clip tasks ran in the `dask worker` processes, not in the CLI.
    worker_logs = "".join((server_tmp / f"dask-worker-{i}.log").read_text(errors="replace") for i in range(2))
    assert "clip-" in worker_logs, worker_logs[-3000:]


def test_cli_preprocess_with_local_workers_and_a_temporary_api(small_dataset: Path, tmp_path: Path) -> None:
    """`--workers 2` without PREFECT_API_URL: msata starts the temporary API itself."""
    store = tmp_path / "store"
    done = run_cli(
        clean_env(tmp_path), "preprocess", "--dataset", "folder", "--root", str(small_dataset), "--store", str(store), "--workers", "2"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 done" in done.stdout, done.stdout
    assert len(FeatureStore.open(store).clip_ids()) == 4
