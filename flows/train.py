"""Prefect flow ``train-msata``: speaker-independent cross-validation on a feature store.

prepare (validate + split + MLflow parent run) -> one task per fold (train, select
on validation, test) -> finalize (mean +- std, register, champion rule). Tasks pass
the run directory and fold indices only; every array stays in the feature store
and the checkpoints on disk. Folds run one after another: each uses the whole
GPU of the worker.

Deployed by ``infra/prefect.yaml`` (``prefect deploy --prefect-file infra/prefect.yaml``)
and started with ``prefect deployment run train-msata/<name>``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.settings import configure_environment


@task(name="prepare-experiment", cache_policy=NO_CACHE)
def prepare_task(
    store_path: str,
    dataset: str,
    train: dict[str, Any],
    splits: dict[str, Any],
    model: dict[str, Any],
    expected_feature_config: dict[str, Any] | None,
    run_dir: str | None,
    resume: bool,
    track: bool,
) -> str:
    from features.config import FeatureConfig
    from modeling.experiment import prepare_experiment
    from modeling.splits import SplitConfig
    from modeling.train_loop import TrainConfig

    expected = FeatureConfig.from_dict(expected_feature_config) if expected_feature_config else None
    path = prepare_experiment(store_path, dataset, TrainConfig.from_dict(train), SplitConfig(**splits), model, expected, run_dir, resume, track)
    return str(path)


@task(name="train-fold", cache_policy=NO_CACHE, task_run_name="fold-{fold_index}")
def fold_task(run_dir: str, fold_index: int) -> dict[str, Any]:
    from dataclasses import asdict

    from modeling.experiment import run_fold

    logger = get_run_logger()

    def on_progress(event) -> None:
        if event.kind == "epoch_end" and event.record is not None:
            r = event.record
            logger.info("fold %d epoch %d/%d: loss %.4f val UAR %.4f (%.1fs)", fold_index, r.epoch, event.epochs, r.train_loss, r.val_uar, r.seconds)

    result = run_fold(run_dir, fold_index, on_progress)
    logger.info("fold %d: test UAR %.4f WA %.4f (best epoch %d)", fold_index, result.test["uar"], result.test["wa"], result.best_epoch)
    return asdict(result)


@task(name="finalize-experiment", cache_policy=NO_CACHE)
def finalize_task(run_dir: str, register: bool) -> dict[str, Any]:
    from dataclasses import asdict

    from modeling.experiment import finalize_experiment

    return asdict(finalize_experiment(run_dir, register=register))


@flow(name="train-msata", log_prints=True)
def train_msata(
    store_path: str,
    dataset: str,
    train: dict[str, Any] | None = None,
    splits: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    expected_feature_config: dict[str, Any] | None = None,
    run_dir: str | None = None,
    resume: bool = False,
    track: bool = True,
    register: bool = True,
) -> dict[str, Any]:
    """Cross-validate msata on ``store_path``.

    ``train`` / ``splits`` / ``model`` override ``TrainConfig`` / ``SplitConfig`` /
    ``MsataConfig`` fields (e.g. ``{"epochs": 30}``). ``resume=True`` continues an
    interrupted experiment in the same run directory.
    """
    configure_environment()
    logger = get_run_logger()
    run_path = prepare_task(store_path, dataset, train or {}, splits or {}, model or {}, expected_feature_config, run_dir, resume, track)
    from modeling.experiment import load_spec

    n_folds = len(load_spec(run_path)["folds"])
    for index in range(n_folds):
        fold_task(run_path, index)
    result = finalize_task(run_path, register and track)
    summary = result["summary"]
    logger.info(
        "%s: test UAR %.4f +- %.4f, WA %.4f +- %.4f over %d fold(s); registered %s",
        dataset, summary["uar_mean"], summary["uar_std"], summary["wa_mean"], summary["wa_std"], n_folds, result.get("registered"),
    )
    return result

