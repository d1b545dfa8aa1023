"""Training and testing one cross-validation fold (the body of ``modeling.training.experiment.run_fold``).

``run_fold`` owns the bookkeeping (opening the fold's run, ending it on failure, the
skip of a finished fold); this module trains with model choice on the fold's
validation speakers, evaluates ``best.pt`` once on its test speakers and logs the
fold's parameters, metrics and plots through a
:class:`~modeling.training.run_logger.RunLogger`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modeling.data import splits as sp
from modeling.training import distributed as dist
from modeling.training.members import member_metrics, train_members
from modeling.training.metrics import ClassificationMetrics, compute_metrics
from modeling.training.run_dir import write_json
from modeling.training.train_loop import (
    ProgressCallback,
    ProgressEvent,
    TrainConfig,
    predict,
    seed_everything,
    train_model,
    training_device,
)

if TYPE_CHECKING:
    from features.config import FeatureConfig
    from modeling.network.encoder import MsataModel
    from modeling.training.experiment_spec import ExperimentSpec
    from modeling.training.run_logger import RunLogger

RESULT_FILE = "result.json"
REFIT_DIR = "refit"  # with train.refit: the checkpoints of the model retrained on training + validation speakers
PROBED_FILE = "probed.pt"  # with train.probe_weight: the tested model with its pooled probe (best.pt stays as trained)


@dataclass
class FoldResult:
    index: int
    test: dict[str, float]  # wa, uar, macro_f1 on the fold's test speakers
    confusion: list[list[int]]
    best_epoch: int
    best_val_uar: float
    epochs_run: int
    stopped_early: bool
    best_path: str  # the model tested: the refit one when train.refit is set
    run_id: str | None = None
    selection_test: dict[str, float] | None = None  # with train.refit: the test figures of the model chosen on validation
    # with train.probe_weight: the probe's C and validation UAR, validation UAR with and without it, and
    # "test_model", the test figures of the model without it (reported beside the mixed ones, chooses nothing)
    probe: dict[str, Any] | None = None
    # with train.members > 1: each member's seed, best epoch and validation UAR, the ensemble's validation UAR, and
    # "test_first_member", the test figures of member 0 alone (reported beside the ensemble's, chooses nothing)
    members: dict[str, Any] | None = None

    @property
    def shipped_val_uar(self) -> float:
        """Validation UAR of the model the fold ships: with its pooled probe when it has one (not with a
        refit, which trained on the validation speakers: then the model's choice on validation); the
        members' ensemble with train.members."""
        if self.probe and "val_uar_mixed" in self.probe:
            return float(self.probe["val_uar_mixed"])
        if self.members:
            return float(self.members["val_uar_ensemble"])
        return self.best_val_uar


def loaders(spec: ExperimentSpec, fold: sp.Fold, config: TrainConfig, ctx: dist.DistContext = dist.SINGLE):
    """(train, validation, test) loaders, and the function that makes them (``train.refit`` builds its loader
    over training + validation speakers with it once the first training is over)."""
    from modeling.data.dataset import ClipDataset, make_loader
    from storage.feature_store import FeatureStore

    store = FeatureStore.open(spec.store_path)
    manifest = store.manifest()
    _, copies = sp.split_speed_copies(manifest) if spec.data.speed_copies else (manifest, {})
    if spec.copies_hash is not None and sp.copies_hash(copies) != spec.copies_hash:
        raise sp.ProtocolError(
            f"{spec.store_path}: its speed copies changed since the experiment began (fingerprint {spec.copies_hash} then, "
            f"{sp.copies_hash(copies)} now); start a new run"
        )
    label_of = dict(zip(manifest["clip_id"].astype(str), manifest["label"].astype(str), strict=False))
    speaker_of = dict(zip(manifest["clip_id"].astype(str), manifest["speaker"].astype(str), strict=False))  # for train.speaker_norm
    duration_of = dict(zip(manifest["clip_id"].astype(str), manifest["duration_s"].astype(float), strict=False))  # long clips
    index = {name: i for i, name in enumerate(spec.label_names)}
    data_config = spec.data
    pin = training_device(config, ctx).type == "cuda"

    def loader(ids: tuple[str, ...], train: bool, workers: int, with_copies: bool | None = None, cache: bool = True):
        # [data] speed_copies: the training clips' perturbed copies join them (never validation or test);
        # with_copies=True without train: the same clips in evaluation mode (the pooled probe's fit);
        # cache=False for a single pass over the clips (no clip cache filled)
        if train if with_copies is None else with_copies:
            ids = sp.ids_with_copies(ids, copies)
        settings = data_config if cache else replace(data_config, in_memory=False)
        labels, speakers = [index[label_of[c]] for c in ids], [speaker_of[c] for c in ids]
        ds = ClipDataset(spec.store_path, ids, labels, store.config, settings, train, speakers, durations=[duration_of[c] for c in ids])
        return make_loader(ds, config.batch_size, workers, config.seed, pin, ctx.rank, ctx.world_size)

    return (
        loader(fold.train_ids, True, config.num_workers),
        loader(fold.val_ids, False, config.num_workers),
        loader(fold.test_ids, False, 0),
        loader,
    )


def start_pretrained_blocks(model: MsataModel, feature_config: FeatureConfig) -> None:
    """Fine-tuned encoder blocks start from the packaged weights (sha256-checked on load); a
    resumed fold then overwrites them from its checkpoint."""
    if not model.config.audio_finetune_blocks:
        return
    from features.audio_encoders.stage import load_packaged_encoder

    name = feature_config.audio_encoder.name
    model.audio_frontend.load_top_blocks(load_packaged_encoder(name, "cpu"))


def train_and_test_fold(
    spec: ExperimentSpec,
    fold: sp.Fold,
    fold_dir: Path,
    logger: RunLogger,
    run_id: str | None,
    progress: ProgressCallback | None,
    ctx: dist.DistContext = dist.SINGLE,
) -> FoldResult:
    """Every rank runs this with the same arguments; only rank 0 logs (to ``run_id``) and writes result.json."""
    from modeling.network.encoder import MsataModel
    from modeling.training.checkpoint import load_trained_model

    fold_index = fold.index
    run_id = run_id if ctx.is_main else None  # the other ranks log nothing
    logger.set_tags(run_id, {"msata.world_size": str(ctx.world_size)})  # a tag, not a param: a resume may use another world size
    logger.log_params(
        run_id,
        {
            "fold": str(fold_index),
            "train_speakers": json.dumps(fold.train_speakers),
            "val_speakers": json.dumps(fold.val_speakers),
            "test_speakers": json.dumps(fold.test_speakers),
            "n_train": str(len(fold.train_ids)),
            "n_val": str(len(fold.val_ids)),
            "n_test": str(len(fold.test_ids)),
        },
    )
    config = spec.train
    train_loader, val_loader, test_loader, make_loader = loaders(spec, fold, config, ctx)
    if spec.data.speed_copies:  # the training examples: recordings and the store's copies of them
        logger.log_params(run_id, {"n_train_with_copies": str(len(train_loader.dataset))})
    label_names = spec.label_names
    meta = {
        "model_config": spec.model.to_dict(),
        "feature_config": spec.feature_config.to_dict(),
        "label_names": label_names,
        "dataset": spec.dataset,
        "modalities": spec.modalities,  # None in specs written before it was recorded: inference assumes both
    }

    def on_progress(event: ProgressEvent) -> None:
        if event.kind == "epoch_end" and event.record is not None:
            logger.log_epoch(run_id, event.record)  # checkpointed before this event: never logged twice
        if progress:
            event.fold = fold_index
            progress(event)

    def on_member_progress(event: ProgressEvent) -> None:  # members' epochs are not the fold's curves: progress only
        if progress:
            event.fold = fold_index
            progress(event)

    def initial_model(settings: TrainConfig = config) -> MsataModel:
        seed_everything(settings.seed)  # the initial weights too: a rerun of a fold (or its refit) starts from the same model
        model = MsataModel(spec.model)
        start_pretrained_blocks(model, spec.feature_config)
        return model

    def test(path: Path) -> ClassificationMetrics:
        model, _, _ = load_trained_model(path, device)
        y, probs, _, _ = predict(model, test_loader, device, ctx)  # gathered: the whole test set on every rank
        return compute_metrics(y, probs.argmax(axis=1), len(label_names))

    result = train_model(initial_model(), train_loader, val_loader, config, fold_dir, meta, resume=True, progress=on_progress, ctx=ctx)
    if result.best_path is None:
        raise RuntimeError(f"fold {fold_index} finished without a best checkpoint in {fold_dir}")
    device = training_device(config, ctx)
    tested_path, selection_metrics = result.best_path, None
    if config.refit:
        # Same recipe, same initial weights, training + validation speakers, stopped at the epoch chosen on
        # validation; its epochs are not logged as the fold's curves (they have no validation figures).
        del train_loader, val_loader  # their clip caches go before the refit's loader fills its own
        refit = train_model(
            initial_model(),
            make_loader(fold.train_ids + fold.val_ids, True, config.num_workers),
            None,
            config,
            fold_dir / REFIT_DIR,
            meta,
            resume=True,
            progress=(lambda event: progress(replace(event, fold=fold_index, phase="refit"))) if progress else None,
            ctx=ctx,
            stop_after_epoch=result.best_epoch,
        )
        selection_metrics, tested_path = test(result.best_path), refit.best_path
    members_record = None
    if config.members > 1:  # a seed ensemble: members 1.. train on new loaders over the same clips, the fold ships their mean
        tested_path, members_record = train_members(
            result, initial_model, train_loader, val_loader, config, fold_dir, meta, device, ctx, on_member_progress
        )
        members_record["test_first_member"] = test(result.best_path).scalars()
    probe_record = None
    if config.probe_weight > 0:
        train_loader = val_loader = None  # their clip caches go before the probe's loaders fill their own
        tested_path, probe_record = attach_pooled_probe(spec, fold, make_loader, tested_path, fold_dir, test, device, ctx)
    metrics = test(tested_path)
    fold_result = FoldResult(
        index=fold_index,
        test=metrics.scalars(),
        confusion=metrics.confusion.tolist(),
        best_epoch=result.best_epoch,
        best_val_uar=result.best_val_uar,
        epochs_run=result.epochs_run,
        stopped_early=result.stopped_early,
        best_path=str(tested_path),
        run_id=run_id,
        selection_test=selection_metrics.scalars() if selection_metrics else None,
        probe=probe_record,
        members=members_record,
    )
    if not ctx.is_main:
        return fold_result
    selection = {f"selection_test_{k}": v for k, v in selection_metrics.scalars().items()} if selection_metrics else {}
    logger.log_metrics(
        run_id,
        {f"test_{k}": v for k, v in metrics.scalars().items()}
        | {"best_epoch": result.best_epoch, "best_val_uar": result.best_val_uar}
        | selection
        | probe_metrics(probe_record)
        | member_metrics(members_record),
    )
    logger.log_confusion(run_id, metrics.confusion, label_names, fold_dir / "confusion_test.png", f"fold {fold_index} test")
    logger.log_learning_curves(run_id, result.history, fold_dir / "learning_curves.png", f"fold {fold_index}")
    logger.end(run_id)
    write_json(fold_dir / RESULT_FILE, asdict(fold_result))  # last: marks the fold as done
    return fold_result


def attach_pooled_probe(
    spec: ExperimentSpec,
    fold: sp.Fold,
    make_loader: Any,
    tested_path: Path,
    fold_dir: Path,
    test: Any,
    device: Any,
    ctx: dist.DistContext,
) -> tuple[Path, dict[str, Any]]:
    """``train.probe_weight``: fit the pooled probe (``modeling.training.probe_fit``) and write the tested
    model with it to ``fold_dir / PROBED_FILE``; returns that path and the probe's record for FoldResult.
    Of ``spec`` it reads ``train`` and ``label_names`` only (``bench/gpu_ravdess.py`` passes just those)."""
    from modeling.network.pooled_probe import CHECKPOINT_KEY
    from modeling.training.checkpoint import load_checkpoint, load_trained_model, save_checkpoint
    from modeling.training.probe_fit import choose_probe, pooled_features

    config, workers = spec.train, spec.train.num_workers
    train_clips = pooled_features(make_loader(fold.train_ids, False, workers, with_copies=True, cache=False), ctx)
    val_loader = make_loader(fold.val_ids, False, workers)
    val_clips = pooled_features(val_loader, ctx)
    refit_on = None
    if config.refit:
        refit_on = pooled_features(make_loader(fold.train_ids + fold.val_ids, False, workers, with_copies=True, cache=False), ctx)
    # Rank 0 fits and the others take its probe: a fit's last bits may depend on the BLAS threads of a machine.
    n_classes = len(spec.label_names)
    choice = (
        choose_probe(train_clips, val_clips, n_classes, config.probe_weight, config.seed, refit_on, mix=config.probe_mix)
        if ctx.is_main
        else None
    )
    choice = dist.gather_objects(choice, ctx)[0]
    probed = fold_dir / PROBED_FILE
    if ctx.is_main:
        payload = load_checkpoint(tested_path)
        payload[CHECKPOINT_KEY] = choice.probe.to_checkpoint()
        save_checkpoint(probed, payload)
    dist.barrier(ctx)  # the other ranks read it next
    record = choice.record() | {"test_model": test(tested_path).scalars()}
    if not config.refit:  # a refit model has trained on the validation speakers: no validation figure for it
        for key, path in (("val_uar_model", tested_path), ("val_uar_mixed", probed)):
            model, _, _ = load_trained_model(path, device)
            y, probs, _, _ = predict(model, val_loader, device, ctx)
            record[key] = compute_metrics(y, probs.argmax(axis=1), n_classes).uar
    return probed, record


def probe_metrics(record: dict[str, Any] | None) -> dict[str, float]:
    """The probe's figures as MLflow metrics of the fold's run (none without a probe)."""
    if record is None:
        return {}
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}  # not "mix" (a param of the run) nor "test_model"
    scalars = {k if k.startswith("probe_") else f"probe_{k}": float(v) for k, v in numbers.items()}
    return scalars | {f"test_model_alone_{k}": v for k, v in record["test_model"].items()}
