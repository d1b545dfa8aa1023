"""Cross-validation driver: protocol -> per-fold training -> test metrics -> a run logger.

Three steps, each a plain function of paths so a Prefect flow can wrap them as thin
tasks (``flows/train.py``), and :func:`run_cross_validation` chains them:

1. :func:`prepare_experiment` validates the store against the protocol (raising
   before any training), builds the folds, writes the typed experiment spec
   (:class:`~modeling.training.experiment_spec.ExperimentSpec`, ``experiment.json``) and
   the split files into the run directory and opens the experiment-level (parent) run;
2. :func:`run_fold` trains one fold (model choice on its validation speakers),
   evaluates ``best.pt`` once on the test speakers and logs a nested run;
3. :func:`finalize_experiment` aggregates mean +- std over folds and registers the
   fold model with the best *validation* UAR (test scores never choose anything).

Runs, metrics, plots and the registration go through the
:class:`~modeling.training.run_logger.RunLogger` given to ``prepare_experiment``
(``MlflowRunLogger`` from ``modeling.tracking``, or ``NullRunLogger``), which the run
directory records for the later steps; this package never imports a tracker.

:func:`cross_validation_chain` is the one order of the three steps: the ``train-msata`` flow
(``msata train``, ``msata demo``, the deployments) runs it with its Prefect tasks, and
:func:`run_cross_validation` with the plain functions (library use and tests, no Prefect).

The run directory (default ``$MSATA_HOME/runs/<dataset>/<key>``, the key hashing
store, configs and protocol) holds the checkpoints; ``resume=True`` continues an
interrupted experiment there: finished folds are skipped, the interrupted fold
resumes from its ``last.pt``, the same tracked runs are reused.

One module of ~350 lines because prepare, run_fold and finalize are the three steps of one chain and share the run-directory contract; the spec type is in experiment_spec.py and one fold's body in fold_run.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from features.config import FeatureConfig
from features.recipes import canonical_name
from modeling.data import splits as sp
from modeling.network.encoder import MsataConfig
from modeling.training.experiment_spec import ExperimentSpec, build_model_config, load_spec, make_data_config
from modeling.training.experiment_spec import _hash as _hash
from modeling.training.fold_run import RESULT_FILE, FoldResult, train_and_test_fold
from modeling.training.metrics import metrics_from_confusion, summarize_folds
from modeling.training.run_dir import SPEC_FILE, RunDirError, check_run_dir, clear_run_dir, write_json  # noqa: F401  (RunDirError: re-exported)
from modeling.training.run_logger import RunLogger, load_run_logger, record_run_logger
from modeling.training.train_loop import ProgressCallback, TrainConfig
from storage.home import msata_home

if TYPE_CHECKING:
    import pandas as pd

RUN_FILE = "mlflow_run.json"


@dataclass
class CVResult:
    run_dir: str
    dataset: str
    label_names: list[str]
    folds: list[FoldResult]
    summary: dict[str, float]  # wa_mean, wa_std, uar_mean, ...
    confusion: list[list[int]]  # summed over folds
    parent_run_id: str | None = None
    selected_fold: int | None = None
    registered: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def prepare_experiment(
    store_path: str,
    dataset: str,
    train_config: TrainConfig,
    split_config: sp.SplitConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    expected_feature_config: FeatureConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    *,
    logger: RunLogger,
    run_tags: dict[str, str] | None = None,
    data_overrides: dict[str, Any] | None = None,
) -> Path:
    """Validate, split, persist the experiment spec; returns the run directory.

    ``logger`` opens (or, resumed, reopens) the experiment-level run and is recorded in the
    run directory, where :func:`run_fold` and :func:`finalize_experiment` find it.
    ``run_tags`` go on that run, new or resumed (``train-msata`` passes its
    Prefect flow-run id: a resumed experiment carries the id of the run that resumed it).
    ``data_overrides`` set the loaders' augmentation (``DataConfig``'s ``AUGMENT_FIELDS``:
    a run config's ``[data]`` table); the loaders' other settings come from ``train_config``.
    """
    from storage.feature_store import FeatureStore

    split_config = split_config or sp.SplitConfig()
    store = FeatureStore.open(store_path)
    sp.check_feature_config(store.config, expected_feature_config)
    manifest, copies = sp.split_speed_copies(store.manifest())  # folds are made of recordings; copies only join training
    label_names = sp.resolve_label_names(dataset, manifest) if len(manifest) else []
    sp.validate_manifest(manifest, label_names, split_config)
    folds = sp.make_folds(manifest, split_config)
    model_config = build_model_config(model_overrides, store.config, len(label_names))
    if model_config["audio_finetune_blocks"] and train_config.speaker_norm:
        raise sp.ProtocolError(
            "audio_finetune_blocks with train.speaker_norm: the fine-tuned blocks expect the encoder's own states, not standardised ones; choose one"
        )
    data_config = make_data_config(train_config, data_overrides)
    if data_config.channel_drop and not model_config["audio_layers"]:
        raise sp.ProtocolError(
            f"[data] channel_drop = {data_config.channel_drop} masks a pretrained encoder's state channels; {store_path} holds none "
            "(log-mel: use freq_masks there)"
        )
    if data_config.channel_drop and model_config["audio_finetune_blocks"]:
        # The fine-tuned blocks recompute the top states from one stored state: masks on the top ones
        # would be thrown away and the masked one fed to pretrained blocks. Not measured; refused.
        raise sp.ProtocolError(
            f"[data] channel_drop = {data_config.channel_drop} with audio_finetune_blocks = {model_config['audio_finetune_blocks']}: "
            "the masks are for frozen states; choose one"
        )
    held = trained_modalities(manifest)
    if train_config.probe_weight and not ("audio" in model_config["modalities"] and "audio" in held):
        raise sp.ProtocolError(
            f"train.probe_weight = {train_config.probe_weight} mixes in a probe on pooled audio statistics; "
            f"this model reads {model_config['modalities']} and {store_path} holds {held}"
        )
    if data_config.speed_copies and not copies:
        raise sp.ProtocolError(
            f"[data] speed_copies = true, but {store_path} holds no speed-perturbed copies: make them with msata preprocess --speed-perturb 0.9,1.1"
        )
    if data_config.speed_copies and train_config.speaker_norm:
        raise sp.ProtocolError(
            "[data] speed_copies with train.speaker_norm: a speaker's statistics would mix its recordings with their perturbed copies; choose one"
        )
    spec = ExperimentSpec(
        store_path=str(store_path),
        dataset=canonical_name(dataset),
        label_names=label_names,
        train=train_config,
        data=data_config,
        splits=split_config,
        model=MsataConfig.from_dict(model_config),
        feature_config=store.config,
        feature_config_hash=store.config.config_hash(),
        splits_hash=_hash([[f.index, sorted(f.assignment().items())] for f in folds]),
        protocol=_protocol_name(folds, split_config, manifest, train_config),
        folds=folds,
        modalities=held,
        copies_hash=sp.copies_hash(copies) if data_config.speed_copies else None,
    )
    key = spec.run_key()
    run_dir = Path(run_dir) if run_dir else msata_home() / "runs" / spec.dataset / key
    spec_path = run_dir / SPEC_FILE
    check_run_dir(run_dir)  # a folder msata did not create is refused, resumed or not, before anything is written
    if spec_path.exists() and resume:
        old = load_spec(run_dir)
        old_dict, new_dict = old.to_dict(), spec.to_dict()
        for name in ("dataset", "feature_config_hash", "splits_hash", "model", "label_names", "data"):
            if old_dict[name] != new_dict[name]:
                raise sp.ProtocolError(f"cannot resume {run_dir}: {name} changed from {old_dict[name]!r} to {new_dict[name]!r}")
        if old.copies_hash is not None and old.copies_hash != spec.copies_hash:  # older specs did not record it
            raise sp.ProtocolError(
                f"cannot resume {run_dir}: the store's speed copies changed since the run began "
                f"(fingerprint {old.copies_hash} then, {spec.copies_hash} now); start a new run without --resume"
            )
        spec = replace(spec, train=old.train, data=old.data, mlflow=old.mlflow).resumed_with(train_config)
        logger.reopen(spec.parent_run_id)  # it was KILLED or FAILED, or FINISHED and finalized again
    else:
        clear_run_dir(run_dir)  # a fresh run never mixes with old checkpoints; only msata's own files go
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.write(run_dir)  # first: it marks the folder as msata's
    record_run_logger(run_dir, logger)
    split_files = sp.export_splits(folds, manifest, run_dir)
    if spec.mlflow is None:  # a new experiment (or one not tracked before): a new run, None when the logger tracks nothing
        tags = {"msata.dataset": spec.dataset, "msata.protocol": spec.protocol, "msata.run_dir": str(run_dir)}
        spec.mlflow = logger.start_experiment(spec.dataset, f"cv-{spec.dataset}-{key}", tags)
        with logger.ended_on_failure(spec.parent_run_id):
            _log_experiment(logger, spec, str(store_path), len(manifest), split_files)
    spec.write(run_dir)
    with logger.ended_on_failure(spec.parent_run_id):
        logger.set_tags(spec.parent_run_id, run_tags or {})
        logger.log_artifact(spec.parent_run_id, spec_path, "config")
    return run_dir


def _log_experiment(logger: RunLogger, spec: ExperimentSpec, store_path: str, n_clips: int, split_files: list[Path]) -> None:
    """A new experiment-level run: the store as its input, the resolved config as parameters, the split files."""
    parent = spec.parent_run_id
    logger.log_store_input(parent, store_path, spec.dataset, spec.feature_config_hash, n_clips)
    as_dict = spec.to_dict()
    logged = ("dataset", "store_path", "train", "splits", "model", "feature_config_hash", "splits_hash", "protocol")
    logged += ("data",) if spec.data_is_custom() else ()  # parameters of older runs are left as they were
    params = {k: as_dict[k] for k in logged} | {"n_clips": str(n_clips), "label_names": json.dumps(spec.label_names)}
    logger.log_params(parent, params)
    for path in split_files:
        logger.log_artifact(parent, path, "splits")


def trained_modalities(manifest: pd.DataFrame) -> list[str]:
    """The streams the store holds: a model trained without faces is never shown faces at prediction time."""
    out = ["audio"] if bool(manifest["has_audio"].any()) else []
    if bool((manifest["has_video"] & (manifest["face_ratio"] > 0)).any()):
        out.append("video")
    return out


def _protocol_name(folds: list[sp.Fold], split_config: sp.SplitConfig, manifest: pd.DataFrame, train_config: TrainConfig) -> str:
    """The evaluation protocol, as the registry compares it. Per-speaker normalisation is
    transductive (it uses the test speakers' unlabelled clips), so it is a protocol of its own:
    such a model is never compared with, nor promoted over, an inductive one."""
    base = (
        "given-split"
        if len(folds) == 1 and split_config.use_given_split and sp.given_splits(manifest) is not None
        else f"speaker-{len(folds)}fold"
    )
    return f"{base}+speaker-norm-transductive" if train_config.speaker_norm else base


def run_fold(
    run_dir: str | Path, fold_index: int, progress: ProgressCallback | None = None, nproc: int = 1, logger: RunLogger | None = None
) -> FoldResult:
    """Train, select on validation, test once; idempotent (a finished fold is returned as is).

    ``logger`` defaults to the one ``prepare_experiment`` recorded in the run directory.
    ``nproc > 1`` trains the fold with that many processes under torchrun
    (``modeling/training/fold_worker.py``, one per GPU, or gloo on CPU; their rank 0 logs with
    the recorded logger); this process opens and ends the fold's run and reads the fold's
    result.json when they are done."""
    run_dir = Path(run_dir)
    spec = load_spec(run_dir)
    fold_dir = run_dir / f"fold_{fold_index}"
    result_path = fold_dir / RESULT_FILE
    if result_path.exists():
        return FoldResult(**json.loads(result_path.read_text()))
    folds = spec.folds
    if not 0 <= fold_index < len(folds):
        raise ValueError(f"fold {fold_index} does not exist (0..{len(folds) - 1})")
    fold = folds[fold_index]
    logger = load_run_logger(run_dir) if logger is None else logger

    run_file = fold_dir / RUN_FILE
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.exists() else None
    if run_id:
        logger.reopen(run_id)  # an interrupted fold goes on in the same run
    else:
        run_id = logger.start_child(spec.mlflow, f"fold-{fold_index}", {"msata.fold": str(fold_index)})
        if run_id:  # kept for a resume
            fold_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_file, {"run_id": run_id})
    with logger.ended_on_failure(run_id, spec.parent_run_id):  # Ctrl-C: KILLED, an error: FAILED (the fold and its experiment)
        if nproc == 1:
            return train_and_test_fold(spec, fold, fold_dir, logger, run_id, progress)
        _run_fold_processes(run_dir, fold_index, nproc, progress)
        return FoldResult(**json.loads(result_path.read_text()))


def _run_fold_processes(run_dir: Path, fold_index: int, nproc: int, progress: ProgressCallback | None) -> None:
    """torchrun the fold's ranks; rank 0's training events come back to ``progress``."""
    import logging

    from modeling.training import distributed as dist
    from modeling.training.train_loop import EpochRecord, ProgressEvent

    log = logging.getLogger("msata.fold")

    def on_event(data: dict[str, Any]) -> None:
        if progress:
            record = data.pop("record", None)
            progress(ProgressEvent(**data, record=EpochRecord(**record) if record else None))

    command = dist.torchrun_command(nproc, "modeling.training.fold_worker", [str(run_dir), str(fold_index)])
    dist.run_streaming(command, on_event, log.info, f"fold {fold_index} with {nproc} processes (torchrun)")


def finalize_experiment(run_dir: str | Path, register: bool = True, logger: RunLogger | None = None) -> CVResult:
    """Aggregate the folds; log the summary; register the best-validation fold model (through ``logger``,
    by default the one ``prepare_experiment`` recorded in the run directory)."""
    run_dir = Path(run_dir)
    spec = load_spec(run_dir)
    logger = load_run_logger(run_dir) if logger is None else logger
    fold_results = []
    for index in range(len(spec.folds)):
        path = run_dir / f"fold_{index}" / RESULT_FILE
        if not path.exists():
            raise RuntimeError(f"fold {index} has not finished ({path} missing): run it before finalizing")
        fold_results.append(FoldResult(**json.loads(path.read_text())))
    summary = summarize_folds([f.test for f in fold_results])
    pooled = np.sum([np.asarray(f.confusion) for f in fold_results], axis=0)
    pooled_metrics = metrics_from_confusion(pooled)
    selected = max(fold_results, key=lambda f: (f.shipped_val_uar, -f.index))  # validation only, never test
    result = CVResult(
        run_dir=str(run_dir),
        dataset=spec.dataset,
        label_names=spec.label_names,
        folds=fold_results,
        summary=summary,
        confusion=pooled.tolist(),
        parent_run_id=spec.parent_run_id,
        selected_fold=selected.index,
        extra={"pooled_" + k: v for k, v in pooled_metrics.scalars().items()},
    )
    if all(f.selection_test for f in fold_results):  # train.refit: the models chosen on validation, before their refit
        result.extra |= {"selection_" + k: v for k, v in summarize_folds([f.selection_test for f in fold_results]).items()}
    if all(f.probe for f in fold_results):  # train.probe_weight: the models without their probe, reported beside
        result.extra |= {"model_alone_" + k: v for k, v in summarize_folds([f.probe["test_model"] for f in fold_results]).items()}
    if all(f.members for f in fold_results):  # train.members: member 0 alone (the recipe's own seed), reported beside
        result.extra |= {"first_member_" + k: v for k, v in summarize_folds([f.members["test_first_member"] for f in fold_results]).items()}
    parent = result.parent_run_id
    with logger.ended_on_failure(parent):  # summary and pooled confusion on the parent run; the selected model registered once
        logger.log_metrics(parent, {f"test_{k}": v for k, v in summary.items()} | {f"test_{k}": v for k, v in result.extra.items()})
        logger.log_confusion(parent, pooled, spec.label_names, run_dir / "confusion_pooled.png", "test, all folds")
        if register:
            result.registered = logger.register_model(parent, spec.to_dict(), selected, fold_results, summary)
        logger.end(parent)
    write_json(run_dir / "cv_result.json", asdict(result))
    return result


def run_cross_validation(
    store_path: str,
    dataset: str,
    train_config: TrainConfig | None = None,
    split_config: sp.SplitConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    expected_feature_config: FeatureConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    *,
    logger: RunLogger,
    register: bool = True,
    progress: ProgressCallback | None = None,
    nproc: int = 1,
    data_overrides: dict[str, Any] | None = None,
) -> CVResult:
    """Full speaker-independent cross-validation without Prefect; see the module docstring.
    ``logger``: ``modeling.tracking.run_logger.MlflowRunLogger()`` to track in MLflow, ``NullRunLogger()`` not to."""
    _, result = cross_validation_chain(
        lambda: prepare_experiment(
            store_path,
            dataset,
            train_config or TrainConfig(),
            split_config,
            model_overrides,
            expected_feature_config,
            run_dir,
            resume,
            logger=logger,
            data_overrides=data_overrides,
        ),
        lambda path, index: run_fold(path, index, progress, nproc, logger),
        lambda path: finalize_experiment(path, register=register, logger=logger),
    )
    return result


R = TypeVar("R")


def cross_validation_chain(
    prepare: Callable[[], str | Path], fold: Callable[[str, int], Any], finalize: Callable[[str], R]
) -> tuple[ExperimentSpec, R]:
    """prepare -> every fold in order -> finalize: the one chain of a cross-validation, whatever
    runs the steps (Prefect tasks in ``flows/train.py`` and ``flows/ablation.py``, plain calls in
    :func:`run_cross_validation`). Returns the spec as prepared and what ``finalize`` returned."""
    run_dir = str(prepare())
    spec = load_spec(run_dir)
    for index in range(len(spec.folds)):
        fold(run_dir, index)
    return spec, finalize(run_dir)
