"""The MLflow pyfunc wrapper of a trained msata checkpoint.

It is a thin shell over :mod:`modeling.inference.predictor`, so ``mlflow.pyfunc`` users,
``mlflow models predict`` and ``msata predict`` get the same features, the same
clip strategy and the same table: input a DataFrame with a ``path`` column (audio
or video files), output :func:`modeling.inference.predictions.predictions_frame` (``path``,
``label``, one ``prob_<class>`` column per class, ``n_windows``, ``modalities``,
``duration_s``, ``warnings``, ``error``). A file that cannot be read gets its
``error`` and the other rows are still predicted; its missing values are ``None``
(JSON ``null`` when served), never a bare ``NaN``, which is not JSON.

MLflow loads it from code (``modeling/tracking/pyfunc_code.py``, models-from-code), so
loading unpickles no Python object; the checkpoint artifact goes through
:func:`modeling.training.checkpoint.load_checkpoint` (``weights_only=True``).

Params (optional, per call): ``window_s`` and ``hop_s`` of the timeline windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

DEFAULT_WINDOW_S, DEFAULT_HOP_S = 2.0, 0.5
CODE_PATH = Path(__file__).with_name("pyfunc_code.py")  # the models-from-code entry point


def input_example() -> pd.DataFrame:
    """What a caller sends: file paths. MLflow checks it against the signature when logging; the
    files need not exist (such rows come back with an ``error``)."""
    return pd.DataFrame({"path": ["interview.mp4", "voicemail.wav"]})


def json_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing values as None in object columns: MLflow's server writes them as null, not NaN."""
    return frame.astype(object).where(frame.notna(), None)


def model_signature(label_names: Sequence[str]) -> mlflow.models.ModelSignature:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from modeling.inference.predictions import PROB_PREFIX

    outputs = [ColSpec("string", "path"), ColSpec("string", "label")]
    outputs += [ColSpec("double", PROB_PREFIX + name) for name in label_names]
    outputs += [ColSpec("long", "n_windows"), ColSpec("string", "modalities"), ColSpec("double", "duration_s")]
    outputs += [ColSpec("string", "warnings"), ColSpec("string", "error")]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "path")]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("window_s", "double", DEFAULT_WINDOW_S), ParamSpec("hop_s", "double", DEFAULT_HOP_S)]),
    )


class MsataPyfunc(mlflow.pyfunc.PythonModel):
    """Artifact ``checkpoint``: the training checkpoint file (best validation epoch)."""

    def load_context(self, context: Any) -> None:
        from modeling.inference.predictor import load_predictor

        self.predictor = load_predictor(context.artifacts["checkpoint"], device="auto")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from modeling.inference.predictions import paths_from_input, predictions_frame
        from modeling.inference.predictor import predict_files

        params = params or {}
        paths = paths_from_input(model_input)
        predictions = predict_files(
            self.predictor,
            paths,
            window_s=float(params.get("window_s", DEFAULT_WINDOW_S)),
            hop_s=float(params.get("hop_s", DEFAULT_HOP_S)),
        )
        return json_safe(predictions_frame(predictions, self.predictor.label_names))
