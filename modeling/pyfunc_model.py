"""The MLflow pyfunc wrapper of a trained msata checkpoint.

``predict`` takes a DataFrame with a ``path`` column (audio or video files) and
returns one row per path: ``path``, ``label`` and one ``p_<class>`` probability
column per class. Feature extraction for a path goes through
:func:`features_for_path`, which builds a ``ClipRecord`` from the file extension
and calls ``features.extract.extract_clip`` with the checkpoint's feature config,
so the model sees exactly the features it was trained on (the whole clip, as at
evaluation). ``modeling/inference.py`` (written separately) is the place for
richer inference (batching, face detector reuse, long files); it plugs in by
providing its own ``features_for_path`` replacement via ``MsataPyfunc.extractor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from features.clip import ClipFeatures
from features.config import FeatureConfig

AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus"}
VIDEO_EXTENSIONS = {".mp4", ".flv", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg"}


def output_columns(label_names: Sequence[str]) -> list[str]:
    return [f"p_{name}" for name in label_names]


def load_trained_model(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, FeatureConfig, list[str]]:
    """(model in eval mode, feature config, label names) from a training checkpoint."""
    from modeling.checkpoint import load_checkpoint
    from modeling.encoder import MsataConfig, MsataModel

    state = load_checkpoint(checkpoint_path, map_location=device)
    model = MsataModel(MsataConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["state_dict"])
    model.to(device).eval()
    return model, FeatureConfig.from_dict(state["feature_config"]), list(state["label_names"])


def features_for_path(path: str, feature_config: FeatureConfig) -> ClipFeatures:
    """Extract features of one media file with the training feature config."""
    from features.extract import extract_clip
    from features.manifest import ClipRecord

    suffix = Path(path).suffix.lower()
    if suffix in AUDIO_EXTENSIONS:
        audio, video = path, None
    elif suffix in VIDEO_EXTENSIONS:
        audio, video = path, path  # a video without sound is handled by extract_clip
    else:
        raise ValueError(f"{path}: unsupported extension {suffix!r}; expected one of {sorted(AUDIO_EXTENSIONS | VIDEO_EXTENSIONS)}")
    record = ClipRecord(clip_id=Path(path).stem, dataset="predict", speaker="unknown", label="", audio_path=audio, video_path=video)
    return extract_clip(record, feature_config)


@torch.no_grad()
def predict_features(model: torch.nn.Module, feature_config: FeatureConfig, label_names: Sequence[str], clips: Sequence[ClipFeatures]) -> np.ndarray:
    """Class probabilities (N, C) for whole clips, one at a time (clips differ in length)."""
    from modeling.batch import collate
    from modeling.data import crop_window, features_to_example

    device = next(model.parameters()).device
    out = np.zeros((len(clips), len(label_names)), dtype=np.float64)
    for i, clip in enumerate(clips):
        example = features_to_example(clip, feature_config, -1, crop_window(clip.duration_s, None, None))
        logits = model(collate([example]).to(device)).logits.float()  # (1, C)
        out[i] = torch.softmax(logits, dim=-1)[0].cpu().numpy()
    return out


class MsataPyfunc(mlflow.pyfunc.PythonModel):
    """Artifact ``checkpoint``: the training checkpoint file (best validation epoch)."""

    extractor: Callable[[str, FeatureConfig], ClipFeatures] = staticmethod(features_for_path)

    def load_context(self, context: Any) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.feature_config, self.label_names = load_trained_model(context.artifacts["checkpoint"], device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "path" not in model_input.columns:
            raise ValueError(f"expected a DataFrame with a 'path' column, got {type(model_input).__name__} {getattr(model_input, 'columns', None)}")
        paths = [str(p) for p in model_input["path"]]
        clips = [type(self).extractor(p, self.feature_config) for p in paths]
        probs = predict_features(self.model, self.feature_config, self.label_names, clips)  # (N, C)
        frame = pd.DataFrame(probs, columns=output_columns(self.label_names))
        frame.insert(0, "label", [self.label_names[i] for i in probs.argmax(axis=1)])
        frame.insert(0, "path", paths)
        return frame
