"""Face features on the prediction timeline: which series are chosen, and the extra panel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from features.clip import ClipFeatures
from features.face_landmarks import BLENDSHAPE_NAMES
from modeling.inference.predictions import FilePrediction, WindowPrediction
from modeling.inference.predictor import face_trace
from modeling.inference.timeline_plot import plot_timeline, timeline_figure

SMILE = BLENDSHAPE_NAMES.index("mouthSmileLeft")
JAW = BLENDSHAPE_NAMES.index("jawOpen")


def smiling_clip(n: int = 60) -> ClipFeatures:
    """A smile rising over 2 s, the jaw moving a little, a constant brow, no face in frames 10-14."""
    t = np.arange(n) / 30.0
    scores = np.full((n, 52), 0.3, np.float32)  # constant: says nothing about when
    scores[:, SMILE] = np.linspace(0.0, 0.9, n)
    scores[:, JAW] = 0.2 + 0.1 * np.sin(2 * np.pi * 3 * t)
    mask = np.ones(n, bool)
    mask[10:15] = False
    scores[~mask] = 0.0
    return ClipFeatures("c", 2.0, face_blendshapes=scores, video_times=t, face_mask=mask)


def prediction_with(trace) -> FilePrediction:
    windows = [WindowPrediction(s, s + 1.0, {"happy": 0.2 + 0.3 * s, "sad": 0.8 - 0.3 * s}) for s in (0.0, 0.5, 1.0)]
    return FilePrediction(path="c.mp4", label="happy", probabilities={"happy": 0.6, "sad": 0.4}, timeline=windows,
                          modalities=["audio", "video"], duration_s=2.0, face_trace=trace)  # fmt: skip


def test_blendshape_trace_keeps_the_ones_that_move_with_gaps_without_a_face() -> None:
    trace = face_trace(smiling_clip(), n_blendshapes=2)
    assert trace.kind == "blendshapes" and trace.names == ["mouthSmileLeft", "jawOpen"]
    assert trace.values.shape == (60, 2) and np.isnan(trace.values[10:15]).all() and not np.isnan(trace.values[:10]).any()
    assert trace.values[-1, 0] > trace.values[0, 0] + 0.8  # the smile rises


def test_crop_trace_is_the_detector_probability() -> None:
    mask = np.array([True, False, True])
    clip = ClipFeatures(
        "c",
        0.1,
        face_crops=np.zeros((3, 8, 8, 3), np.uint8),
        video_times=np.arange(3) / 30,
        face_mask=mask,
        face_probs=np.array([0.99, 0.4, 0.97], np.float32),
    )
    trace = face_trace(clip)
    assert trace.names == ["face probability"] and np.allclose(trace.values[:, 0], [0.99, 0.0, 0.97])
    assert face_trace(ClipFeatures("a", 1.0)) is None


def test_plot_has_the_face_panel_under_the_probabilities(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from PIL import Image

    with_faces = prediction_with(face_trace(smiling_clip(), n_blendshapes=3))
    fig = timeline_figure(with_faces)
    panels = {ax.get_label(): ax for ax in fig.axes}
    face_ax = panels["face features"]
    assert [line.get_label() for line in face_ax.get_lines()] == with_faces.face_trace.names
    probs_ax = next(ax for ax in fig.axes if ax is not face_ax)
    assert face_ax.get_position().y1 <= probs_ax.get_position().y0 + 1e-6  # under the class probabilities
    plt.close(fig)
    tall, short = plot_timeline(with_faces, tmp_path / "faces.png"), plot_timeline(prediction_with(None), tmp_path / "plain.png")
    with Image.open(tall) as a, Image.open(short) as b:
        assert a.height > b.height * 1.3
    fig = timeline_figure(with_faces, face_features=False)
    assert "face features" not in {ax.get_label() for ax in fig.axes}
    plt.close(fig)
