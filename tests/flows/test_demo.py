"""``msata demo`` trains through the same chain as ``msata train`` and the deployments:
``flows.train.run_training`` -> the ``train-msata`` flow (no second driver of its own)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace


def test_the_demo_trains_through_run_training(tmp_path: Path, monkeypatch) -> None:
    import flows.demo as demo
    import flows.train
    import modeling.inference.predictor as predictor

    calls = []
    store, unseen = tmp_path / "demo" / "store", tmp_path / "demo" / "unseen.mp4"
    monkeypatch.setattr(demo, "build_demo_store", lambda root, config, say, progress: (store, unseen, "summary"))

    def fake_run_training(store_path, dataset, **kwargs):
        calls.append((store_path, dataset, kwargs))
        return SimpleNamespace(registered={"version": "1"}, folds=[], selected_fold=0)

    monkeypatch.setattr(flows.train, "run_training", fake_run_training)
    monkeypatch.setattr(predictor, "load_predictor", lambda uri: uri)
    monkeypatch.setattr(predictor, "predict_files", lambda model, files: [SimpleNamespace(ok=False, model=model, files=files)])
    config = demo.DemoConfig(epochs=3)
    progress = object()
    result = demo.run_demo(tmp_path, config, say=lambda s: None, train_progress=progress)

    [(store_path, dataset, kwargs)] = calls
    assert (store_path, dataset) == (str(store), "demo")
    assert kwargs["train"] == {"epochs": 3, "seed": config.seed, **config.train}
    assert kwargs["splits"] == {"n_folds": config.n_folds, "seed": config.seed}
    assert kwargs["model"] == config.model and kwargs["progress"] is progress
    assert Path(kwargs["run_dir"]).parent == tmp_path / "demo" / "runs"
    assert result.model_uri == "models:/msata-demo@champion" and result.prediction.files == [str(unseen)]
