"""Pure parts of the cross-validation driver."""

from __future__ import annotations

import pandas as pd

from modeling.experiment import trained_modalities


def _manifest(has_audio: list[bool], has_video: list[bool], face_ratio: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"has_audio": has_audio, "has_video": has_video, "face_ratio": face_ratio})


def test_trained_modalities_follow_the_store():
    assert trained_modalities(_manifest([True, True], [False, False], [0.0, 0.0])) == ["audio"]  # RAVDESS speech
    assert trained_modalities(_manifest([True, False], [True, True], [0.9, 0.0])) == ["audio", "video"]
    assert trained_modalities(_manifest([False], [True], [0.5])) == ["video"]
    # Videos in which no face was ever found give the model no face tokens to learn from.
    assert trained_modalities(_manifest([True], [True], [0.0])) == ["audio"]
