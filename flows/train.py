"""Prefect flow ``train-msata``: speaker-independent cross-validation on a feature store.

prepare (validate + split + MLflow parent run, tagged with this flow run's id) -> one
task per fold (train, select on validation, test) -> finalize (mean +- std, register,
champion rule) -> artifacts (the cross-validation table and a link to the MLflow run,
``flows/artifacts.py``). Tasks pass the run directory and fold indices only; every
array stays in the feature store and the checkpoints on disk. Folds run one after
another: each uses the whole GPU of the worker, or with ``nproc`` > 1 all its GPUs: the
fold task then launches ``torchrun --nproc-per-node nproc`` (``modeling/training/fold_worker.py``,
data-parallel, one process per GPU; gloo processes on a CPU-only worker) and waits for it.

One path for every run: deployments (``infra/prefect.yaml``, ``prefect deployment run
train-msata/<name>``), ``msata train`` and ``msata demo`` (both through :func:`run_training`,
the flow run in the CLI's process) all run this flow, whose body is
``modeling.training.experiment.cross_validation_chain`` over the three tasks below, so a fix
to the chain lands everywhere and every run shows up in Prefect the same way.

Progress: a callback cannot be a flow parameter (parameters are serialised for the
API, and Dask pickles them). The fold tasks instead call :func:`report_progress`,
which hands each training event to the callbacks registered with
:func:`progress_hook` *in the process the task runs in*. ``msata train`` runs the
flow and its tasks in its own process and registers its progress bars there; a
deployment's worker registers none, and the epochs reach the UI as log lines.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.settings import configure_environment, flush_api_logs
from flows.train_params import DataParams, ModelOverrides, SplitParams, TrainParams

if TYPE_CHECKING:
    from modeling.training.experiment import CVResult
    from modeling.training.run_logger import RunLogger

# Prefect validates flow parameters with a pydantic model whose base class has a `register`
# attribute, so our documented `register` parameter draws a harmless UserWarning on every call;
# users saw it twice above the progress bars of `msata train`.
warnings.filterwarnings("ignore", message='Field name "register" in "Train_MsataModel" shadows', category=UserWarning)

_PROGRESS_HOOKS: list[Callable[[Any], None]] = []  # this process's listeners; never serialised


@contextmanager
def progress_hook(callback: Callable[[Any], None]) -> Iterator[None]:
    """Send the training events of fold tasks running in this process to ``callback`` while the block runs."""
    _PROGRESS_HOOKS.append(callback)
    try:
        yield
    finally:
        _PROGRESS_HOOKS.remove(callback)


def report_progress(event: Any) -> None:
    for callback in list(_PROGRESS_HOOKS):
        callback(event)


def run_logger(track: bool) -> RunLogger:
    """The run logger a flow's ``track`` parameter picks: MLflow (at the URI MLflow's environment or
    MSATA_HOME names) or none. The fold and finalize tasks find it in the run directory."""
    from modeling.tracking.run_logger import MlflowRunLogger
    from modeling.training.run_logger import NullRunLogger

    return MlflowRunLogger() if track else NullRunLogger()


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
    data: dict[str, Any] | None = None,
) -> str:
    from prefect.runtime import flow_run

    from features.config import FeatureConfig
    from modeling.data.splits import SplitConfig
    from modeling.training.experiment import prepare_experiment
    from modeling.training.train_loop import TrainConfig

    expected = FeatureConfig.from_dict(expected_feature_config) if expected_feature_config else None
    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name} if flow_run.id else None
    path = prepare_experiment(
        store_path,
        dataset,
        TrainConfig.from_dict(train),
        SplitConfig(**splits),
        model,
        expected,
        run_dir,
        resume,
        logger=run_logger(track),
        run_tags=tags,
        data_overrides=data,
    )
    return str(path)


@task(name="train-fold", cache_policy=NO_CACHE, task_run_name="fold-{fold_index}")
def fold_task(run_dir: str, fold_index: int, nproc: int = 1) -> dict[str, Any]:
    from dataclasses import asdict

    from modeling.training.experiment import run_fold

    logger = get_run_logger()

    def on_progress(event) -> None:
        if event.kind == "epoch_end" and event.record is not None and event.phase == "refit":
            r = event.record
            logger.info("fold %d refit epoch %d: loss %.4f (%.1fs)", fold_index, r.epoch, r.train_loss, r.seconds)
        elif event.kind == "epoch_end" and event.record is not None:
            r = event.record
            logger.info(
                "fold %d%s epoch %d/%d: loss %.4f val UAR %.4f (%.1fs)",
                fold_index,
                "" if event.phase == "train" else f" {event.phase}",  # "member k" with train.members
                r.epoch,
                event.epochs,
                r.train_loss,
                r.val_uar,
                r.seconds,
            )
        report_progress(event)

    result = run_fold(run_dir, fold_index, on_progress, nproc)
    logger.info("fold %d: test UAR %.4f WA %.4f (best epoch %d)", fold_index, result.test["uar"], result.test["wa"], result.best_epoch)
    return asdict(result)


@task(name="finalize-experiment", cache_policy=NO_CACHE)
def finalize_task(run_dir: str, register: bool) -> dict[str, Any]:
    from dataclasses import asdict

    from modeling.training.experiment import finalize_experiment

    return asdict(finalize_experiment(run_dir, register=register))


@flow(name="train-msata", log_prints=True)
def train_msata(
    store_path: str,
    dataset: str,
    train: TrainParams = TrainParams(),  # noqa: B008 - immutable pydantic defaults: the UI form shows them
    splits: SplitParams = SplitParams(),  # noqa: B008
    model: ModelOverrides = ModelOverrides(),  # noqa: B008
    expected_feature_config: dict[str, Any] | None = None,
    run_dir: str | None = None,
    resume: bool = False,
    track: bool = True,
    register: bool = True,
    data: DataParams = DataParams(),  # noqa: B008
    nproc: Annotated[
        int,
        Field(ge=1, description="Training processes per fold (torchrun, data-parallel): the worker's GPU count, or gloo processes on CPU."),
    ] = 1,
) -> dict[str, Any]:
    """Cross-validate msata on ``store_path``.

    ``train`` / ``splits`` are ``TrainConfig`` / ``SplitConfig``; ``model`` overrides
    ``MsataConfig`` fields (only those given; the store decides the input sizes);
    ``data`` is the loaders' augmentation (``DataConfig``'s ``AUGMENT_FIELDS``).
    Dicts are accepted and validated (e.g. ``train={"epochs": 30}``); unknown keys
    are refused. ``resume=True`` continues an interrupted experiment in the same run
    directory, with any ``nproc``. ``nproc`` > 1 trains each fold with that many
    processes; ``train.batch_size`` stays the global batch, so results do not depend on it.
    """
    from dataclasses import asdict

    from flows.artifacts import publish_cv_artifacts
    from modeling.training.experiment import cross_validation_chain

    configure_environment()
    logger = get_run_logger()
    spec, result = cross_validation_chain(
        lambda: prepare_task(
            store_path,
            dataset,
            train.to_config().to_dict(),
            asdict(splits.to_config()),
            model.overrides(),
            expected_feature_config,
            run_dir,
            resume,
            track,
            data.overrides(),
        ),
        lambda path, index: fold_task(path, index, nproc),
        lambda path: finalize_task(path, register and track),
    )
    n_folds = len(spec.folds)
    summary = result["summary"]
    logger.info(
        "%s: test UAR %.4f +- %.4f, WA %.4f +- %.4f over %d fold(s); registered %s",
        dataset,
        summary["uar_mean"],
        summary["uar_std"],
        summary["wa_mean"],
        summary["wa_std"],
        n_folds,
        result.get("registered"),
    )
    publish_cv_artifacts(result, spec.mlflow.experiment_id if spec.mlflow else None)
    return result


def cv_result_from_dict(data: dict[str, Any]) -> CVResult:
    from modeling.training.experiment import CVResult
    from modeling.training.fold_run import FoldResult

    return CVResult(**(data | {"folds": [FoldResult(**f) for f in data["folds"]]}))


def run_training(
    store_path: str,
    dataset: str,
    train: dict[str, Any] | None = None,
    splits: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    register: bool = True,
    progress: Callable[[Any], None] | None = None,
    nproc: int = 1,
    data: dict[str, Any] | None = None,
) -> CVResult:
    """Run ``train-msata`` in this process against PREFECT_API_URL or a temporary API (``msata train``, ``msata demo``).

    ``progress`` receives every training event of the fold tasks through
    :func:`progress_hook`; it is never a flow parameter. The store is opened first, so a
    wrong path fails at once, before any API server is started.
    """
    from prefect.exceptions import ParameterTypeError

    from flows.api import prefect_api
    from storage import FeatureStore

    params = {
        "store_path": str(store_path),
        "dataset": dataset,
        "train": train or {},
        "splits": splits or {},
        "model": model or {},
        "run_dir": str(run_dir) if run_dir else None,
        "resume": resume,
        "register": register,
        "nproc": nproc,
        "data": data or {},
    }
    try:  # here, before a server starts or a flow run is created: "train.epoch: Extra inputs are not permitted"
        train_msata.validate_parameters(params)
    except ParameterTypeError as err:
        raise ValueError(str(err)) from err
    FeatureStore.open(str(store_path))
    with prefect_api(), progress_hook(progress) if progress else nullcontext():
        try:
            result = train_msata(**params)
        finally:
            flush_api_logs()  # before a temporary API server stops
    return cv_result_from_dict(result)
