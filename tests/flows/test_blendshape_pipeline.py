"""Blendshape faces end to end, as a user runs it: `msata preprocess --face-representation
blendshapes` on synthetic talking faces (MediaPipe finds the photographed face in every frame),
cross-validation on the stored scores, and `msata predict --plot` on new files, which recomputes
the blendshapes from the model's recorded feature config; a real CREMA-D clip when present."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from flow_servers import MSATA, REPO, clean_env, preprocess_synthetic

from storage import FeatureStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from modeling.data.splits import SplitConfig
    from modeling.training.experiment import run_cross_validation
    from modeling.training.run_logger import NullRunLogger
    from modeling.training.train_loop import TrainConfig

    raw, tmp = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("cli")
    store = preprocess_synthetic(raw, tmp, "--face-representation", "blendshapes")
    model = {"d_model": 32, "n_heads": 2, "n_layers": 1, "audio_downsample": 4, "ctm_dim": 16}
    train = TrainConfig(epochs=2, batch_size=4, num_workers=0, max_duration_s=1.0)
    result = run_cross_validation(str(store), "folder", train, SplitConfig(n_folds=2), model, run_dir=tmp / "run", logger=NullRunLogger())
    return {"raw": raw, "store": store, "tmp": tmp, "checkpoint": result.folds[0].best_path}


def test_store_holds_blendshapes_and_the_model_reads_them(trained: dict) -> None:
    from modeling.training.checkpoint import load_checkpoint

    store = FeatureStore.open(trained["store"])
    clip = store.read(store.clip_ids()[0])
    assert clip.face_crops is None and clip.face_blendshapes.shape == (len(clip.video_times), 52) and clip.face_mask.all()
    payload = load_checkpoint(trained["checkpoint"], map_location="cpu")
    assert payload["model_config"]["video_input"] == "blendshapes" and payload["modalities"] == ["audio", "video"]


def test_predict_recomputes_blendshapes_and_plots_them(trained: dict) -> None:
    from PIL import Image

    clip = sorted((trained["raw"] / "clips").glob("*happy*.mp4"))[0]
    plot = trained["tmp"] / "timeline.png"
    args = ["predict", str(clip), "--model", str(trained["checkpoint"]), "--plot", str(plot), "--window", "0.5", "--hop", "0.25"]
    done = subprocess.run(
        [MSATA, *args], env=clean_env(trained["tmp"]) | {"COLUMNS": "200"}, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "audio+video" in done.stdout and "no face" not in done.stdout
    with Image.open(plot) as image:
        assert image.height > 400  # probabilities + the face panel


@pytest.mark.shared_data
def test_real_crema_d_clip(trained: dict, shared_data: Path) -> None:
    from modeling.inference.predictor import load_predictor

    video = shared_data / "crema_d_sample" / "VideoFlash" / "1001_DFA_HAP_XX.flv"
    if not video.exists():
        pytest.skip(f"{video} not found")
    predictor = load_predictor(trained["checkpoint"], device="cpu")
    prediction = predictor.predict_file(video)
    assert prediction.ok and prediction.modalities == ["audio", "video"], prediction
    trace = prediction.face_trace
    assert trace.kind == "blendshapes" and len(trace.names) == 4 and np.nanmax(trace.values) <= 1.0
    smile = predictor.extract(video)[0].face_blendshapes[:, 44:46]  # mouthSmileLeft/Right on a happy sentence
    assert float(np.max(smile)) > 0.5
