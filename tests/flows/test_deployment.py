"""`prefect deployment run train-msata/<name>` for real: server, process pool, deploy, worker.

Everything runs in subprocesses with their own PREFECT_HOME / MSATA_HOME in a temp
dir, against a `prefect server start` bound to a free port on 127.0.0.1; teardown
kills every process group it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from training_fixtures import TINY_MODEL, build_tiny_store

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "local-process"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def prefect_env(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_")) and k != "PYTHONDONTWRITEBYTECODE"}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "MSATA_HOME": str(tmp_path / "home"),
    }
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started: list[subprocess.Popen] = [server]
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None:
                text = (tmp_path / "server.log").read_text(errors="replace")
                if "address already in use" in text.lower() or "could not bind" in text.lower():
                    pytest.skip(f"prefect server cannot bind 127.0.0.1:{port}: {text[-300:]}")
                raise AssertionError(f"prefect server exited with {server.returncode}:\n{text[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prefect server did not become healthy within 240 s"
            time.sleep(1)
        yield env, started
    finally:
        for proc in started:  # only the process groups this fixture started
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def prefect(env: dict, *args: str, timeout: int = 180) -> str:
    done = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_deployment_run_on_a_process_worker(prefect_env, tmp_path: Path) -> None:
    env, started = prefect_env
    store = tmp_path / "store"
    build_tiny_store(store, n_speakers=4, clips_per_speaker=3)

    # The recipe of infra/prefect.yaml and docs/training.md, as written: both pools, then every deployment.
    prefect(env, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    prefect(env, "work-pool", "create", "gpu", "--type", "process", "--overwrite")
    prefect(env, "deploy", "--prefect-file", "infra/prefect.yaml", "--all")
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        deployed = {d.name: d for d in client.read_deployments()}
    assert sorted(deployed) == ["crema-d", "crema-d-gpu", "nightly-crema-d", "ravdess"], sorted(deployed)
    schema = deployed["crema-d"].parameter_openapi_schema  # typed configs: the UI shows a form with defaults
    assert schema["definitions"]["TrainConfig"]["properties"]["epochs"]["default"] == 40, schema
    assert {"n_folds", "seed"} <= set(schema["definitions"]["SplitConfig"]["properties"])
    gpu = deployed["crema-d-gpu"]
    assert "CUDA_VISIBLE_DEVICES" not in json.dumps(gpu.job_variables or {}), gpu.job_variables
    assert any("git_clone" in json.dumps(step) for step in gpu.pull_steps or []), gpu.pull_steps
    nightly = deployed["nightly-crema-d"]
    assert nightly.parameters["workers"] == 2 and nightly.work_pool_name == POOL
    params = {
        "store_path": str(store),
        "dataset": "crema-d",
        "train": {"epochs": 1, "batch_size": 4, "num_workers": 0, "max_duration_s": 1.5},
        "splits": {"n_folds": 2},
        "model": TINY_MODEL,
        "resume": False,
    }
    out = prefect(env, "deployment", "run", "train-msata/crema-d", "--params", json.dumps(params))
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    run_id = match.group(1)

    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", POOL, "--run-once", "--type", "process"],
        env=env,
        cwd=tmp_path,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started.append(worker)
    try:
        worker.wait(timeout=480)
    except subprocess.TimeoutExpired:
        pytest.fail("worker did not finish the flow run within 480 s:\n" + (tmp_path / "worker.log").read_text()[-3000:])
    finally:
        worker_log.close()
    state = json.loads(prefect(env, "flow-run", "inspect", run_id, "--output", "json"))
    log_text = (tmp_path / "worker.log").read_text(errors="replace")
    assert state["state"]["type"] == "COMPLETED", log_text[-4000:]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("msata-crema-d")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # parent + 2 folds
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and "test_uar_mean" in parent[0].data.metrics
    assert client.get_model_version_by_alias("msata-crema-d", "champion").version
