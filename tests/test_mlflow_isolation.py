"""tests/conftest.py puts MLflow's process-wide tracking and registry URIs back after every test.

The two tests run in file order: the first points MLflow at a store of its own and leaves it
so (as the train-flow test's code did); the second must not see that store. Before the conftest
fixture, the ablation test that followed the train-flow test searched the train-flow's registry.
"""

from __future__ import annotations

import os
from pathlib import Path

_LEFT_BEHIND: list[str] = []


def test_a_test_points_mlflow_at_its_own_store_and_leaves_it_so(tmp_path: Path) -> None:
    import mlflow

    from modeling.tracking.runs import configure_tracking

    uri = configure_tracking(f"sqlite:///{tmp_path / 'own.db'}")  # no monkeypatch, no undo
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
    assert os.environ["MLFLOW_TRACKING_URI"] == uri and os.environ["MLFLOW_REGISTRY_URI"] == uri  # what MLflow exports
    _LEFT_BEHIND.append(uri)


def test_the_next_test_does_not_see_it() -> None:
    import mlflow

    leaked = set(_LEFT_BEHIND)
    assert mlflow.get_tracking_uri() not in leaked and mlflow.get_registry_uri() not in leaked
    assert os.environ.get("MLFLOW_TRACKING_URI") not in leaked and os.environ.get("MLFLOW_REGISTRY_URI") not in leaked
