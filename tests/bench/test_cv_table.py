"""bench/cv_table.py's training curves: read from each fold's last.pt, the largest fall after epoch 3."""

from __future__ import annotations

from pathlib import Path

from bench.cv_table import curves
from modeling.training.checkpoint import save_checkpoint


def test_curves_report_each_folds_epochs_and_the_largest_fall(tmp_path: Path) -> None:
    for k, uars in enumerate([[0.5, 0.9, 0.6, 0.7, 0.65], [0.4, 0.5, 0.55, 0.5]]):
        history = [{"epoch": e + 1, "val_uar": u, "seconds": 10.0} for e, u in enumerate(uars)]
        payload = {"model_config": {}, "feature_config": {}, "label_names": ["a"], "state_dict": {}, "history": history}
        save_checkpoint(tmp_path / f"fold_{k}" / "last.pt", payload)
    lines = curves(tmp_path, 3)
    # fold 0: the fall 0.9 -> 0.6 comes before epoch 3 and is not counted; 0.7 -> 0.65 is
    assert "| 0 | 0.500 0.900 0.600 0.700 0.650 | 50 | 0.050 |" in lines
    assert "| 1 | 0.400 0.500 0.550 0.500 | 40 | 0.050 |" in lines
    assert "| 2 | (no last.pt) | | |" in lines and lines[-1] == "| **all** | | | 0.050 |"
