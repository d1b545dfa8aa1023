"""Metrics against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modeling.training.metrics import compute_metrics, confusion_matrix, mean_std, summarize_folds

Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def test_confusion_matrix_rows_are_true_classes() -> None:
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cm.dtype == np.int64


def test_wa_uar_f1_by_hand() -> None:
    m = compute_metrics(Y_TRUE, Y_PRED, 3)
    assert m.wa == pytest.approx(4 / 6)
    # recalls 2/3, 1/2, 1/1
    assert m.uar == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1: class 0 P=1 R=2/3 -> 0.8; class 1 P=1/2 R=1/2 -> 0.5; class 2 P=1/2 R=1 -> 2/3
    assert m.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m.n == 6


def test_uar_differs_from_wa_on_imbalanced_data() -> None:
    # Always predicting the majority class: WA 0.9, UAR 0.5.
    m = compute_metrics([0] * 9 + [1], [0] * 10, 2)
    assert m.wa == pytest.approx(0.9)
    assert m.uar == pytest.approx(0.5)
    assert m.macro_f1 == pytest.approx((2 * 9 / 19 + 0.0) / 2)


def test_absent_class_is_left_out_but_false_positive_class_counts() -> None:
    base = compute_metrics(Y_TRUE, Y_PRED, 3)
    padded = compute_metrics(Y_TRUE, Y_PRED, 4)  # class 3 neither true nor predicted
    assert (padded.uar, padded.macro_f1) == pytest.approx((base.uar, base.macro_f1))
    fp = compute_metrics([0, 1], [0, 3], 4)  # class 3 predicted, never true: F1 0 counted
    assert fp.uar == pytest.approx(0.5)  # recall over classes 0 and 1
    assert fp.macro_f1 == pytest.approx((1.0 + 0.0 + 0.0) / 3)


def test_perfect_and_errors() -> None:
    assert compute_metrics([1, 0, 2], [1, 0, 2], 3).scalars() == {"wa": 1.0, "uar": 1.0, "macro_f1": 1.0}
    with pytest.raises(ValueError, match="outside"):
        compute_metrics([0, 5], [0, 0], 3)
    with pytest.raises(ValueError, match="empty"):
        compute_metrics([], [], 3)
    with pytest.raises(ValueError, match="2 labels"):
        confusion_matrix([0, 1], [0], 2)


def test_fold_summary_uses_sample_std() -> None:
    mean, std = mean_std([0.5, 0.7])
    assert mean == pytest.approx(0.6)
    assert std == pytest.approx(math.sqrt(0.02))
    assert mean_std([0.4]) == (0.4, 0.0)
    summary = summarize_folds([{"uar": 0.5, "wa": 0.6}, {"uar": 0.7, "wa": 0.8}])
    assert summary["uar_mean"] == pytest.approx(0.6) and summary["wa_std"] == pytest.approx(math.sqrt(0.02))
    with pytest.raises(ValueError, match="missing"):
        summarize_folds([{"uar": 0.5}, {"wa": 0.5}])
