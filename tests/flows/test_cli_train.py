"""`msata train` as a user runs it (a subprocess) against a real `prefect server`: one path with deployments.

The CLI run is a `train-msata` flow run on the server, with its log lines, its
artifacts (cross-validation table, link to the MLflow run) and the MLflow parent run
tagged with its id; the terminal shows msata's own output only.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flow_servers import MSATA, start_prefect_server, stop_all
from training_fixtures import TINY_MODEL, build_tiny_store

pytestmark = pytest.mark.slow
TRAIN = {"epochs": 1, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0.5, "num_workers": 0, "max_duration_s": 1.5}


def test_cli_train_is_a_flow_run_with_logs_artifacts_and_a_tagged_mlflow_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started: list[subprocess.Popen] = []
    try:
        env = start_prefect_server(tmp_path, started)
        env = {k: v for k, v in env.items() if k != "PREFECT_LOGGING_LEVEL"}  # msata's own logging defaults
        store = tmp_path / "store"
        build_tiny_store(store, n_speakers=4, clips_per_speaker=3)
        config = tmp_path / "run.json"
        config.write_text(json.dumps({"train": TRAIN, "model": TINY_MODEL}))
        done = subprocess.run(
            [MSATA, "train", "--store", str(store), "--dataset", "crema-d", "--folds", "2", "--config", str(config)],
            env=env | {"COLUMNS": "200"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        terminal = done.stdout + done.stderr
        assert done.returncode == 0, terminal[-4000:]
        assert "mean ± std" in done.stdout and "registered:" in done.stdout, terminal
        for prefect_line in ("| INFO", "| WARNING", "Finished in state", "prepare-experiment", "Created flow run"):
            assert prefect_line not in terminal, terminal  # the terminal stays msata's

        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train-msata"])))
            assert len(runs) == 1 and runs[0].state is not None and runs[0].state.is_completed(), runs
            run = runs[0]
            assert run.parameters["train"]["epochs"] == 1 and run.parameters["splits"]["n_folds"] == 2
            messages = "\n".join(
                entry.message for entry in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            )
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        assert "fold 0 epoch 1/1" in messages and "fold 1: test UAR" in messages and "crema-d: test UAR" in messages, messages
        assert {a.key for a in artifacts} == {"cv-crema-d", "mlflow-run-crema-d"}

        mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}")
        parents = [
            r
            for r in mlflow.search_runs([mlflow.get_experiment_by_name("msata-crema-d").experiment_id])
            if "mlflow.parentRunId" not in r.data.tags
        ]
        assert len(parents) == 1 and parents[0].data.tags["prefect.flow_run_id"] == str(run.id)
        assert parents[0].data.tags["prefect.flow_run_name"] == run.name
    finally:
        stop_all(started)
