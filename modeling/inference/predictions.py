"""What inference returns: per-file and per-window predictions, and their file formats.

``FilePrediction`` is the result for one file (label, class probabilities, timeline
windows, warnings, or an ``error``); ``predictions_frame`` is the one-row-per-file
table that ``msata predict``, the predict-folder flow and the MLflow pyfunc all
return, with one ``prob_<class>`` column per class.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

PROB_PREFIX = "prob_"  # probability column of class c in predictions_frame: prob_<c>


@dataclass
class WindowPrediction:
    """One timeline window [start_s, end_s); probabilities None when it holds no audio frame and no face."""

    start_s: float
    end_s: float
    probabilities: dict[str, float] | None
    n_audio_frames: int = 0
    n_face_frames: int = 0


@dataclass
class Thumbnail:
    time_s: float
    image: np.ndarray  # (S, S, 3) uint8 RGB face crop


@dataclass
class FaceTrace:
    """Face features over time for the timeline plot: the few blendshapes that move most
    (blendshape models) or the face detector's probability (crop models)."""

    times: np.ndarray  # (Tv,) float64 seconds
    values: np.ndarray  # (Tv, K) float32, NaN where no face was found
    names: list[str]  # K series names
    kind: str  # "blendshapes" | "face probability"


@dataclass
class FilePrediction:
    """The result for one file; ``error`` is set (and the rest empty) when it could not be predicted."""

    path: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    timeline: list[WindowPrediction] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)  # streams the model actually saw
    duration_s: float | None = None
    clip_strategy: str | None = None  # "whole clip" | "mean of N windows of L s"
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    thumbnails: list[Thumbnail] = field(default_factory=list, repr=False)  # for plots; not serialised
    face_trace: FaceTrace | None = field(default=None, repr=False)  # for plots; not serialised

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (everything but the thumbnails)."""
        return {
            "path": self.path,
            "label": self.label,
            "probabilities": dict(self.probabilities),
            "timeline": [vars(w).copy() for w in self.timeline],
            "modalities": list(self.modalities),
            "duration_s": self.duration_s,
            "clip_strategy": self.clip_strategy,
            "warnings": list(self.warnings),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FilePrediction:
        data = dict(data)
        data["timeline"] = [WindowPrediction(**w) for w in data.get("timeline", [])]
        return cls(**data)


def paths_from_input(model_input: Any) -> list[str]:
    """Paths from a pyfunc input: a DataFrame with a ``path`` column, a Series, a list or one string."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "path" not in model_input.columns:
            raise ValueError(f"expected a DataFrame with a 'path' column, got columns {list(model_input.columns)}")
        return [str(p) for p in model_input["path"]]
    if isinstance(model_input, (str, Path)):
        return [str(model_input)]
    if isinstance(model_input, (pd.Series, list, tuple, np.ndarray)):
        return [str(p) for p in model_input]
    raise ValueError(f"expected a DataFrame with a 'path' column or a list of paths, got {type(model_input).__name__}")


def write_jsonl(predictions: Sequence[FilePrediction], path: str | Path) -> Path:
    """One JSON object per line (``FilePrediction.to_dict``), timelines included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for pred in predictions:
            handle.write(json.dumps(pred.to_dict(), allow_nan=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[FilePrediction]:
    with Path(path).open(encoding="utf-8") as handle:
        return [FilePrediction.from_dict(json.loads(line)) for line in handle if line.strip()]


def predictions_frame(predictions: Sequence[FilePrediction], label_names: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per file: path, label, prob_<class>..., n_windows, modalities, duration_s, warnings, error.

    ``label_names`` fixes the probability columns (needed when every file failed);
    by default they come from the first successful prediction. Failed files have
    NaN probabilities and a null label; warnings are joined with " | ".
    """
    import pandas as pd

    if label_names is None:
        label_names = next((list(p.probabilities) for p in predictions if p.ok), [])
    rows = []
    for pred in predictions:
        row: dict[str, Any] = {"path": pred.path, "label": pred.label}
        for name in label_names:
            row[PROB_PREFIX + name] = pred.probabilities.get(name, math.nan)
        row["n_windows"] = len(pred.timeline)
        row["modalities"] = ",".join(pred.modalities)
        row["duration_s"] = math.nan if pred.duration_s is None else pred.duration_s
        row["warnings"] = " | ".join(pred.warnings)
        row["error"] = pred.error
        rows.append(row)
    columns = ["path", "label", *(PROB_PREFIX + n for n in label_names), "n_windows", "modalities", "duration_s", "warnings", "error"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype(
        {"path": "string", "label": "string", "modalities": "string", "warnings": "string", "error": "string", "n_windows": "int64"}
    )
