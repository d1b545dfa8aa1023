"""Real servers for the flow tests: `prefect server start`, `dask scheduler` + `dask worker` processes.

Every process is started in its own process group, bound to 127.0.0.1 on a free
port, with its own PREFECT_HOME / MSATA_HOME; `stop_all` ends only the groups
started here (SIGTERM, then SIGKILL after 20 s).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT, DASK, MSATA = str(BIN / "prefect"), str(BIN / "dask"), str(BIN / "msata")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(tmp: Path) -> dict[str, str]:
    """The test process's environment without its Prefect/MLflow settings, homed in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MSATA_")) and k != "PYTHONDONTWRITEBYTECODE"}
    env |= {
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MSATA_HOME": str(tmp / "home"),
    }
    return env


def spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path, started: list[subprocess.Popen]) -> subprocess.Popen:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    started.append(proc)
    return proc


def stop_all(started: list[subprocess.Popen]) -> None:
    for proc in started:  # only the process groups started by these helpers
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def start_prefect_server(tmp: Path, started: list[subprocess.Popen]) -> dict[str, str]:
    """`prefect server start` on a free port; returns an environment whose PREFECT_API_URL points at it."""
    port = free_port()
    env = clean_env(tmp) | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_LOGGING_LEVEL": "INFO"}
    log = tmp / "prefect-server.log"
    server = spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log, tmp, started)
    deadline = time.monotonic() + 240
    while True:
        if server.poll() is not None:
            text = log.read_text(errors="replace")
            if "address already in use" in text.lower() or "could not bind" in text.lower():
                pytest.skip(f"prefect server cannot bind 127.0.0.1:{port}: {text[-300:]}")
            raise AssertionError(f"prefect server exited with {server.returncode}:\n{text[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as reply:
                if reply.status == 200:
                    return env
        except OSError:
            pass
        assert time.monotonic() < deadline, "prefect server did not become healthy within 240 s"
        time.sleep(1)


def start_dask_cluster(tmp: Path, env: dict[str, str], started: list[subprocess.Popen], n_workers: int = 2) -> str:
    """`dask scheduler` plus ``n_workers`` `dask worker` processes (one thread each); returns the address."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], env, tmp / "dask-scheduler.log", tmp, started)
    for i in range(n_workers):
        spawn(
            [
                DASK,
                "worker",
                address,
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--no-dashboard",
                "--name",
                f"w{i}",
                "--local-directory",
                str(tmp / f"w{i}"),
            ],
            env,
            tmp / f"dask-worker-{i}.log",
            tmp,
            started,
        )
    with Client(address, timeout=120) as client:
        client.wait_for_workers(n_workers, timeout=240)
    return address


def preprocess_synthetic(raw_dir: Path, work_dir: Path, *options: str) -> Path:
    """A tiny synthetic folder corpus (4 speakers, happy/sad, 1 s clips) in ``raw_dir``, preprocessed
    through the real `msata preprocess` CLI with ``options`` (e.g. an audio encoder); returns the store."""
    from features.synthetic import make_synthetic_dataset

    make_synthetic_dataset(raw_dir, n_speakers=4, clips_per_class=1, classes=("happy", "sad"), duration_s=1.0, size=(160, 120))
    store = work_dir / "store"
    args = ["preprocess", "--dataset", "folder", "--root", str(raw_dir), "--store", str(store), *options]
    done = subprocess.run(
        [MSATA, *args], env=clean_env(work_dir) | {"COLUMNS": "200"}, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return store
