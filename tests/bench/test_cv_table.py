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


def test_the_probe_table_puts_the_model_alone_beside_the_mixture() -> None:
    from bench.cv_table import probe_table

    def fold(index: int, alone: float, mixed: float) -> dict:
        scores = {"wa": alone, "uar": alone, "macro_f1": alone}
        probe = {"C": 0.1, "weight": 0.5, "probe_val_uar": 0.6, "val_uar_model": 0.7, "val_uar_mixed": 0.8, "test_model": scores}
        return {"index": index, "test": {"wa": mixed, "uar": mixed, "macro_f1": mixed}, "probe": probe}

    lines = probe_table({"folds": [fold(0, 0.5, 0.6), fold(1, 0.7, 0.8)]})
    assert "| 0 | 0.1 | 0.600 | 0.700 | 0.800 | 0.500 | 0.600 | 0.500 | 0.500 |" in lines
    assert lines[-1] == "| **mean ± std** | | 0.600 | 0.700 | 0.800 | 0.600 ± 0.141 | 0.700 ± 0.141 | 0.600 ± 0.141 | 0.600 ± 0.141 |"
