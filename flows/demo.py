"""``msata demo``: the whole product on an embedded synthetic dataset, in minutes on a laptop CPU.

synthetic talking-face clips (a real face photograph, voiced audio; the emotion
sets the voice's pitch contour and the face's tint and motion) -> preprocess-dataset
-> speaker-independent cross-validation (the ``train-msata`` flow, through
``flows.train.run_training`` as ``msata train`` runs it) -> MLflow run + registered model
``msata-demo`` -> prediction on a clip of a speaker the model never saw.
Every step is the same code the real corpora go through; finished steps are skipped
on a re-run (the store skips clips, the dataset is only generated once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_CLASSES = ("neutral", "happy", "sad", "angry")


@dataclass(frozen=True)
class DemoConfig:
    n_speakers: int = 6  # 3 folds of 2 test speakers; validation speakers come from the rest
    clips_per_class: int = 2  # per speaker: 6 x 4 x 2 = 48 clips
    duration_s: float = 2.0
    fps: float = 25.0
    size: tuple[int, int] = (320, 240)
    n_folds: int = 3
    epochs: int = 12
    seed: int = 0
    train: dict[str, Any] = field(
        default_factory=lambda: {"batch_size": 8, "num_workers": 0, "patience": 6, "lr": 1e-3, "warmup_epochs": 1.0}
    )
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 96, "n_layers": 2, "n_heads": 4})


@dataclass
class DemoResult:
    raw_dir: Path
    store_dir: Path
    unseen_clip: Path
    preprocess: Any  # PreprocessSummary
    cv: Any  # CVResult
    model_uri: str
    prediction: Any  # FilePrediction
    plot: Path | None


def build_demo_dataset(root: Path, config: DemoConfig) -> tuple[Path, Path]:
    """Generate the training clips once, plus one clip by an unseen speaker."""
    from features.synthetic import class_style, make_synthetic_dataset, make_talking_face_clip, speaker_style

    raw = root / "raw"
    if not (raw / "labels.csv").is_file():
        make_synthetic_dataset(
            raw,
            n_speakers=config.n_speakers,
            clips_per_class=config.clips_per_class,
            classes=DEMO_CLASSES,
            duration_s=config.duration_s,
            fps=config.fps,
            size=config.size,
            seed=config.seed,
        )
    unseen = root / "unseen" / "unseen_speaker_happy.mp4"
    if not unseen.is_file():
        make_talking_face_clip(
            unseen,
            duration_s=4.0,
            fps=30,
            width=config.size[0],
            height=config.size[1],
            label="happy",
            speaker=speaker_style(config.n_speakers + 7, config.seed),
            style=class_style("happy", DEMO_CLASSES.index("happy")),
            seed=424242,
        )
    return raw, unseen


def build_demo_store(
    root: Path, config: DemoConfig, say: Callable[[str], None] = print, preprocess_progress=None
) -> tuple[Path, Path, Any]:
    """(store, unseen clip, preprocessing summary): the demo's clips generated once and run through
    preprocess-dataset into ``root/store`` (a re-run skips stored clips). ``msata ablate --demo`` uses it too."""
    from flows.preprocess import run_preprocessing

    say(
        f"1/4 synthetic talking-face dataset ({config.n_speakers} speakers x {len(DEMO_CLASSES)} emotions x {config.clips_per_class}) in {root / 'raw'}"
    )
    raw, unseen = build_demo_dataset(root, config)
    store = root / "store"
    say(f"2/4 preprocess-dataset flow -> {store}")
    summary = run_preprocessing("folder", raw, store, on_progress=preprocess_progress)
    if summary.failed:
        raise RuntimeError(f"demo preprocessing failed for {summary.failed} clip(s): {summary.failures}")
    return store, unseen, summary


def run_demo(
    home: Path, config: DemoConfig = DemoConfig(), say: Callable[[str], None] = print, train_progress=None, preprocess_progress=None
) -> DemoResult:
    from flows.train import run_training
    from modeling.inference.predictor import load_predictor, predict_files
    from modeling.inference.timeline_plot import plot_timeline

    root = home / "demo"
    store, unseen, summary = build_demo_store(root, config, say, preprocess_progress)
    raw = root / "raw"

    say(f"3/4 {config.n_folds}-fold speaker-independent cross-validation, logged to MLflow")
    cv = run_training(
        str(store),
        "demo",
        train={"epochs": config.epochs, "seed": config.seed, **config.train},
        splits={"n_folds": config.n_folds, "seed": config.seed},
        model=config.model,
        run_dir=root / "runs" / f"cv-{_timestamp()}",
        progress=train_progress,
    )
    model_uri = "models:/msata-demo@champion" if cv.registered else cv.folds[cv.selected_fold or 0].best_path

    say(f"4/4 predicting a clip of a speaker the model never saw: {unseen}")
    prediction = predict_files(load_predictor(model_uri), [str(unseen)])[0]
    plot = None
    if prediction.ok:
        plot = plot_timeline(prediction, root / "unseen_timeline.png")
    return DemoResult(raw, store, unseen, summary, cv, model_uri, prediction, plot)


def _timestamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")
