"""`msata ablate` on the synthetic demo store (tiny settings): every variant on the same folds and
seed, nested MLflow runs under one parent, the side-by-side table as markdown and JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flow_servers import MSATA, REPO, clean_env

from flows.ablation import VARIANTS, select_variants, variant_settings

pytestmark = pytest.mark.slow


def test_variants_differ_only_in_their_settings() -> None:
    train, model = {"epochs": 3, "lambda_ctm": 0.05}, {"d_model": 32}
    by = {v.name: variant_settings(v, train, model) for v in VARIANTS}
    assert by["tarope-ctm"] == (
        {"epochs": 3, "lambda_ctm": 0.05},
        {"d_model": 32, "positions": "tarope", "fusion": "joint", "modalities": ["audio", "video"]},
    )
    assert by["index"][0]["lambda_ctm"] == 0.0 and by["index"][1]["positions"] == "index"
    assert (
        by["late-ctm"][1]["fusion"] == "late"
        and by["audio-only"][1]["modalities"] == ["audio"]
        and by["video-only"][0]["lambda_ctm"] == 0.0
    )
    assert variant_settings(VARIANTS[0], {"lambda_ctm": 0.0}, {})[0]["lambda_ctm"] == 0.1  # a base without CTM: the training default
    with pytest.raises(ValueError, match=r"unknown ablation variant\(s\) \['rope'\]"):
        select_variants(["rope"])


def test_ablate_on_the_demo_store(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from flows.demo import DemoConfig, build_demo_store

    store, _, _ = build_demo_store(
        tmp_path / "demo", DemoConfig(n_speakers=4, clips_per_class=1, duration_s=1.0, size=(160, 120)), say=lambda s: None
    )
    config = tmp_path / "tiny.toml"
    config.write_text(
        "[train]\nbatch_size = 4\nnum_workers = 0\nmax_duration_s = 1.0\n[model]\nd_model = 32\nn_heads = 2\nn_layers = 1\nvideo_channels = [8, 16]\naudio_downsample = 4\nctm_dim = 16\n"
    )
    out = tmp_path / "ablation"
    args = [
        "ablate",
        "--store",
        str(store),
        "--dataset",
        "demo",
        "--folds",
        "2",
        "--epochs",
        "1",
        "--seeds",
        "0",
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    done = subprocess.run(
        [MSATA, *args], env=clean_env(tmp_path) | {"COLUMNS": "200"}, cwd=REPO, capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = (out / "ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == [v.label for v in VARIANTS]
    assert all(r.rstrip(" |").endswith("2") for r in rows) and "±" in table and "TaRoPE + CTM" in done.stdout
    result = json.loads((out / "ablation.json").read_text())
    assert [v["name"] for v in result["variants"]] == [v.name for v in VARIANTS]
    # the same folds for every variant: one split assignment
    specs = [json.loads((out / v.name / "seed-0" / "experiment.json").read_text()) for v in VARIANTS]
    assert len({s["splits_hash"] for s in specs}) == 1 and {s["train"]["seed"] for s in specs} == {0}
    assert (
        specs[-1]["model"]["modalities"] == ["video"] and specs[0]["train"]["lambda_ctm"] == 0.1 and specs[1]["train"]["lambda_ctm"] == 0.0
    )
    # MLflow: one parent, one nested run per variant, each with its folds nested under it; nothing registered
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("msata-demo").experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and "uar_mean.tarope-ctm" in parents[0].data.metrics
    variants = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["msata.variant"] for r in variants) == sorted(v.name for v in VARIANTS)
    assert all(sum(f.data.tags.get("mlflow.parentRunId") == r.info.run_id for f in runs) == 2 for r in variants)
    assert client.search_registered_models() == []
