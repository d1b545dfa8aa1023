"""Classification metrics for emotion recognition: WA, UAR, macro-F1, confusion.

Conventions (the ones SER papers use, spelled out because they differ in edge cases):

* **WA** (weighted accuracy) is plain accuracy: correct / total.
* **UAR** (unweighted average recall) is the mean of per-class recalls over the
  classes *present in y_true*. A class with no test example has no recall; it is
  left out of the mean rather than counted as 0 or 1 (sklearn's balanced accuracy
  does the same).
* **macro-F1** is the mean of per-class F1 over the classes present in y_true or
  y_pred; a class predicted but never true has F1 = 0 (it only adds false
  positives), a class absent from both is left out.
* Fold aggregates are mean and *sample* standard deviation (ddof=1; 0 for a
  single fold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassificationMetrics:
    wa: float
    uar: float
    macro_f1: float
    confusion: np.ndarray  # (C, C) int64, rows = true class, columns = predicted class
    n: int

    def scalars(self) -> dict[str, float]:
        return {"wa": self.wa, "uar": self.uar, "macro_f1": self.macro_f1}


def _as_labels(values: Sequence[int] | np.ndarray, n_classes: int, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        bad = arr[(arr < 0) | (arr >= n_classes)][0]
        raise ValueError(f"{name} holds class index {bad}, outside [0, {n_classes})")
    return arr


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(C, C) counts; entry [i, j] = number of examples of true class i predicted as j."""
    true = _as_labels(y_true, n_classes, "y_true")
    pred = _as_labels(y_pred, n_classes, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} labels but y_pred has {pred.size}")
    flat = np.bincount(true * n_classes + pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def metrics_from_confusion(confusion: np.ndarray) -> ClassificationMetrics:
    cm = np.asarray(confusion, dtype=np.int64)
    total = int(cm.sum())
    if total == 0:
        raise ValueError("cannot compute metrics on an empty set of predictions")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)  # true examples per class
    predicted = cm.sum(axis=0).astype(np.float64)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    uar = float(recall[present].mean())
    f1_classes = (support + predicted) > 0
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted): no 0/0 for counted classes.
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=f1_classes)
    return ClassificationMetrics(
        wa=float(tp.sum() / total),
        uar=uar,
        macro_f1=float(f1[f1_classes].mean()),
        confusion=cm,
        n=total,
    )


def compute_metrics(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> ClassificationMetrics:
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, n_classes))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std() of an empty sequence")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def summarize_folds(per_fold: Sequence[dict[str, float]]) -> dict[str, float]:
    """{"uar": .., ...} per fold -> {"uar_mean": .., "uar_std": .., ...} over folds."""
    if not per_fold:
        raise ValueError("summarize_folds() needs at least one fold")
    keys = list(per_fold[0])
    out: dict[str, float] = {}
    for key in keys:
        missing = [i for i, fold in enumerate(per_fold) if key not in fold]
        if missing:
            raise ValueError(f"metric {key!r} missing from folds {missing}")
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([fold[key] for fold in per_fold])
    return out
