"""The MLflow pyfunc wrapper of a trained msata checkpoint.

It is a thin shell over :mod:`modeling.inference`, so ``mlflow.pyfunc`` users,
``mlflow models predict`` and ``msata predict`` get the same features, the same
clip strategy and the same table: input a DataFrame with a ``path`` column (audio
or video files), output :func:`modeling.predictions.predictions_frame` (``path``,
``label``, one ``prob_<class>`` column per class, ``n_windows``, ``modalities``,
``duration_s``, ``warnings``, ``error``). A file that cannot be read gets its
``error`` and the other rows are still predicted.

Params (optional, per call): ``window_s`` and ``hop_s`` of the timeline windows.
"""

from __future__ import annotations

from typing import Any, Sequence

import mlflow.pyfunc
import pandas as pd

DEFAULT_WINDOW_S, DEFAULT_HOP_S = 2.0, 0.5


def model_signature(label_names: Sequence[str]) -> "mlflow.models.ModelSignature":
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from modeling.predictions import PROB_PREFIX

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
        from modeling.inference import load_predictor

        self.predictor = load_predictor(context.artifacts["checkpoint"], device="auto")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from modeling.inference import predict_files
        from modeling.predictions import paths_from_input, predictions_frame

        params = params or {}
        paths = paths_from_input(model_input)
        predictions = predict_files(
            self.predictor,
            paths,
            window_s=float(params.get("window_s", DEFAULT_WINDOW_S)),
            hop_s=float(params.get("hop_s", DEFAULT_HOP_S)),
        )
        return predictions_frame(predictions, self.predictor.label_names)
