"""One training run in plain PyTorch (no Prefect, no MLflow): fit, evaluate, resume.

AdamW, linear warm-up then cosine decay (per step), CE + lambda * CTM (lambda constant
or on a cosine to 0, ``TrainConfig.ctm_schedule``), gradient
clipping, bf16 autocast on CUDA (fp32 on CPU), early stopping on validation UAR.
After every epoch ``last.pt`` is written atomically, and ``best.pt`` whenever the
validation UAR strictly improves. ``resume=True`` continues from ``last.pt`` with
model, optimiser, scheduler, early-stopping counters, history and RNG states; the
data order and augmentation are functions of (seed, epoch, index), so a resumed run
sees the same batches as an uninterrupted one.

Several processes (torchrun, ``modeling/training/distributed.py``): ``batch_size`` is the global
batch, each rank trains on its share and the gradients are summed over the ranks, so
the optimiser sees what one process would; validation and test predictions are
gathered from all ranks before any metric; only rank 0 writes checkpoints and reports
progress. A checkpoint resumes with any number of processes.

One module of ~370 lines because the loop, its config, the schedule and the epoch records are read together, as nanoGPT's train.py; the several-process helpers are in distributed.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from features.config_keys import reject_unknown_keys
from modeling.data.dataset import ShardedBatchSampler
from modeling.data.examples import DEFAULT_CACHE_BYTES, DataConfig
from modeling.network.batch import Batch
from modeling.network.losses import CTM_SCHEDULES, ctm_weight
from modeling.network.pooled_probe import MIX_KINDS as PROBE_MIX_KINDS
from modeling.network.precision import autocast
from modeling.training import distributed as dist
from modeling.training.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from modeling.training.metrics import ClassificationMetrics, compute_metrics
from modeling.training.mixup import draw_mixup, mix_batch
from modeling.training.weight_average import WeightAverage


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0  # linear warm-up length; cosine decay to 0 afterwards
    encoder_lr_scale: float = 0.1  # fine-tuned pretrained blocks train at lr * this (they start near a good solution)
    lambda_ctm: float = 0.1  # weight of the cross-temporal matching loss (its peak under a schedule)
    ctm_schedule: str = "cosine"  # CTM weight over the run: "cosine" (lambda_ctm at the start -> 0 at the last epoch's end) | "constant"
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    patience: int = 8  # epochs without a validation-UAR improvement before stopping
    max_duration_s: float = 4.0  # training crop length
    eval_max_duration_s: float | None = None  # None = whole clip at eval
    augment: bool = True
    in_memory: bool = True  # cache decoded clips, at most cache_bytes per loader
    cache_bytes: int = DEFAULT_CACHE_BYTES  # per loader (train, validation, test), split across its workers
    speaker_norm: bool = False  # transductive per-speaker standardisation of the audio (see DataConfig)
    refit: bool = False  # after the choice on validation: retrain on training + validation speakers up to the chosen epoch
    ema_decay: float = 0.0  # > 0 (e.g. 0.99): validate, choose, test and ship a moving average of the weights (weight_average.py)
    # > 0: after training, fit a logistic regression on pooled audio statistics (its C chosen on validation) and
    # mix its class probabilities into the model's with this weight (modeling/network/pooled_probe.py)
    probe_weight: float = 0.0
    probe_mix: str = "mean"  # how: "mean" of the probabilities | "geometric" mean (MIX_KINDS in pooled_probe.py)
    mixup_alpha: float = 0.0  # > 0 (e.g. 0.4): train on mixed pairs of clips, weight ~ Beta(alpha, alpha) (mixup.py)
    # > 1: a seed ensemble; each fold trains the recipe this many times (seeds seed, seed + 1, ...) and ships the
    # members' mean class probabilities (modeling/training/members.py)
    members: int = 1
    num_workers: int = 2
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.ctm_schedule not in CTM_SCHEDULES:
            raise ValueError(f"TrainConfig.ctm_schedule={self.ctm_schedule!r}; expected one of {CTM_SCHEDULES}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay={self.ema_decay}; expected 0 (off) or a decay in (0, 1) such as 0.99")
        if not 0.0 <= self.probe_weight <= 1.0:
            raise ValueError(f"TrainConfig.probe_weight={self.probe_weight}; expected 0 (off) or a mixing weight in (0, 1]")
        if self.probe_mix not in PROBE_MIX_KINDS:
            raise ValueError(f"TrainConfig.probe_mix={self.probe_mix!r}; expected one of {PROBE_MIX_KINDS}")
        if not (math.isfinite(self.mixup_alpha) and self.mixup_alpha >= 0.0):
            raise ValueError(f"TrainConfig.mixup_alpha={self.mixup_alpha}; expected 0 (off) or a Beta parameter > 0 such as 0.4")
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise ValueError(f"TrainConfig.members={self.members!r}; expected a whole number of models per fold, 1 (one model) or more")
        if self.members > 1 and self.refit:
            raise ValueError(
                f"TrainConfig.members={self.members} with refit: a refit retrains one model on training + validation speakers; "
                "use one or the other"
            )

    def data_config(self) -> DataConfig:
        return DataConfig(
            max_duration_s=self.max_duration_s,
            eval_max_duration_s=self.eval_max_duration_s,
            augment=self.augment,
            in_memory=self.in_memory,
            cache_bytes=self.cache_bytes,
            speaker_norm=self.speaker_norm,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainConfig:
        data = dict(data or {})
        reject_unknown_keys(data, cls, "TrainConfig")
        return cls(**data)


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_ce: float
    train_ctm: float
    val_loss: float
    val_wa: float
    val_uar: float
    val_macro_f1: float
    lr: float
    seconds: float  # the whole epoch, validation included
    train_clips_per_s: float = 0.0  # training clips per second of the training pass
    data_wait_share: float = 0.0  # share of the training pass spent waiting for the next batch
    ctm_weight: float = math.nan  # mean CTM weight over the epoch's steps (NaN in records written before it was kept)


@dataclass
class ProgressEvent:
    """What a progress callback receives. kind: "epoch_start" | "step" | "epoch_end"."""

    kind: str
    epoch: int
    epochs: int  # the epochs this run trains at most (a refit: up to the epoch chosen on validation)
    step: int = 0
    steps: int = 0
    loss: float | None = None
    record: EpochRecord | None = None
    fold: int | None = None  # set by the cross-validation driver
    # "train" (model choice on validation) | "refit" (training + validation speakers, train.refit) | "member k"
    # (train.members: the k-th extra member, also chosen on validation)
    phase: str = "train"


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class TrainResult:
    best_epoch: int
    best_val_uar: float
    epochs_run: int  # last completed epoch (1-based), resumed epochs included
    stopped_early: bool
    history: list[EpochRecord] = field(default_factory=list)
    best_path: Path | None = None
    last_path: Path | None = None


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group, plus one at ``lr * encoder_lr_scale`` for parameters that start from
    pretrained weights (a model's ``pretrained_parameters()``, e.g. fine-tuned encoder blocks).
    The warm-up cosine schedule scales both groups alike."""
    pretrained = list(getattr(model, "pretrained_parameters", lambda: [])())
    chosen = {id(p) for p in pretrained}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": config.lr}]
    if pretrained:
        groups.append({"params": pretrained, "lr": config.lr * config.encoder_lr_scale})
    return groups


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available")
    return resolved


def training_device(config: TrainConfig, ctx: dist.DistContext = dist.SINGLE) -> torch.device:
    """The device of this process: config.device, and with several CUDA processes cuda:LOCAL_RANK."""
    return dist.device_for(resolve_device(config.device), ctx)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear 0 -> 1 over warm-up, then cosine 1 -> 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _objective(
    model: nn.Module, output: Any, labels: torch.Tensor, lambda_ctm: float, mixup: tuple[float, torch.Tensor] | None = None
) -> tuple[torch.Tensor, float, float]:
    """(total, ce, ctm) from modeling.network.losses.training_objective, with the model's CTM head and widths.

    ``mixup`` = (lam, partner) of a mixed batch (mixup.py): CE is ``lam CE(labels) + (1 - lam) CE(labels[partner])``,
    the CTM term (which does not read labels) counts once."""
    from modeling.network.losses import training_objective

    cfg = getattr(model, "config", None)
    kwargs = (
        {"projector": model.ctm_head, "sigma": cfg.ctm_sigma, "tau": cfg.ctm_tau} if cfg is not None and hasattr(model, "ctm_head") else {}
    )
    result = training_objective(output, labels, lambda_ctm, **kwargs)
    total, ce = result.total, result.ce
    if mixup is not None:
        lam, partner = mixup
        partner_ce = training_objective(output, labels[partner.to(labels.device)]).ce
        ce = lam * result.ce + (1.0 - lam) * partner_ce
        total = ce + lambda_ctm * result.ctm
    return total, float(ce.detach()), float(result.ctm.detach())


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, ctx: dist.DistContext = dist.SINGLE
) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """(labels (N,), probabilities (N, C), clip ids, mean CE) over a loader, in eval mode.

    With several processes each rank predicts its strided share and every rank gets the
    whole set back in the loader's dataset order (so the metrics are those of one process)."""
    model.eval()
    labels, probs, ids, ce_sum = [], [], [], 0.0
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        with autocast(device):
            logits = model(batch).logits.float()  # (B, C)
        if (batch.labels >= 0).all():
            ce_sum += float(nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        labels.extend(batch.labels.cpu().numpy())
        probs.extend(torch.softmax(logits, dim=-1).cpu().numpy())  # C-vectors, one per clip
        ids.extend(batch.clip_ids)
    if ctx.enabled:
        parts = dist.gather_objects((labels, probs, ids, ce_sum), ctx)
        labels, probs, ids = (dist.interleave([part[k] for part in parts]) for k in range(3))
        ce_sum = sum(part[3] for part in parts)
    if not ids:
        raise ValueError("predict() got an empty loader")
    y = np.asarray(labels, dtype=np.int64)
    return y, np.stack(probs), ids, ce_sum / len(y)


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, n_classes: int, ctx: dist.DistContext = dist.SINGLE
) -> tuple[ClassificationMetrics, float]:
    y, p, _, loss = predict(model, loader, device, ctx)
    return compute_metrics(y, p.argmax(axis=1), n_classes), loss


def step_plan(loader: DataLoader) -> list[tuple[int, int]]:
    """(this rank's clips, the global batch's clips) per step; (0, 0) = every batch of a plain loader, weight 1."""
    batches = loader.batch_sampler
    if isinstance(batches, ShardedBatchSampler):
        return batches.step_shares()
    return [(0, 0)] * len(loader)


def train_model(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    config: TrainConfig,
    out_dir: str | Path,
    checkpoint_meta: dict[str, Any],
    resume: bool = False,
    progress: ProgressCallback | None = None,
    ctx: dist.DistContext = dist.SINGLE,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train with early stopping on validation UAR; checkpoints go to ``out_dir``.

    ``checkpoint_meta`` holds the inference half of the checkpoint format:
    model_config, feature_config, label_names. With several processes (``ctx``) every
    rank calls this with its own loaders (``make_loader(..., rank, world_size)``).

    Without a ``val_loader`` (the refit on training + validation speakers) nothing is
    chosen: the learning-rate schedule is the one of ``config.epochs``, training stops
    after ``stop_after_epoch`` (the epoch chosen on validation by the first run) and
    ``best.pt`` is that last epoch; the epoch records carry NaN validation figures.
    """
    if val_loader is None and stop_after_epoch is None:
        raise ValueError("train_model without a val_loader needs stop_after_epoch (the epoch chosen on validation)")
    last_epoch = min(config.epochs, stop_after_epoch) if stop_after_epoch is not None else config.epochs
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    device = training_device(config, ctx)
    n_classes = len(checkpoint_meta["label_names"])
    seed_everything(config.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    n_steps = len(step_plan(train_loader))  # global steps: the same for any number of processes
    schedule = warmup_cosine(config.epochs * n_steps, int(round(config.warmup_epochs * n_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    report = progress if ctx.is_main else None

    start_epoch, best_uar, best_epoch, bad_epochs, history = 1, -math.inf, 0, 0, []
    if resume and last_path.exists():
        state = load_checkpoint(last_path, map_location=device, require_resume=True)
        if average is not None:  # the checkpoint's model is the average; the optimiser goes on from the raw weights
            if "raw_state_dict" not in state:
                raise CheckpointError(f"cannot resume {last_path} with train.ema_decay = {config.ema_decay}: it was written without it")
            average.restore(state["state_dict"], state["weight_average_updates"], device)
        elif "raw_state_dict" in state:  # its state_dict is an average: the optimiser's weights are the raw ones
            raise CheckpointError(f"cannot resume {last_path} without train.ema_decay: it was written with a weight average")
        model.load_state_dict(state["raw_state_dict"] if average is not None else state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best_uar = float(state["best_metric"])
        best_epoch, bad_epochs = int(state.get("best_epoch", 0)), int(state.get("bad_epochs", 0))
        history = [EpochRecord(**r) for r in state.get("history", [])]
        restore_rng(state["rng"])  # rank 0's states, on every rank: the ranks stay alike
        if bad_epochs >= config.patience:  # it had already stopped early
            start_epoch = last_epoch + 1

    batch_sampler = train_loader.batch_sampler
    params = [p for p in model.parameters() if p.requires_grad]
    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, last_epoch + 1):
        if isinstance(batch_sampler, ShardedBatchSampler):
            batch_sampler.set_epoch(epoch)
        plan = step_plan(train_loader)
        if report:
            report(ProgressEvent("epoch_start", epoch, last_epoch, steps=n_steps))
        model.train()
        started = time.perf_counter()
        sums = np.zeros(4)  # loss, ce, ctm (each times clips), clips
        weights = []  # the CTM weight of every step (the same on every rank)
        waited = 0.0
        batches = iter(train_loader)
        for step, (mine, global_clips) in enumerate(plan, start=1):
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            # global step over the whole run (the learning-rate schedule's horizon, also in a refit)
            ctm_w = ctm_weight(config.lambda_ctm, config.ctm_schedule, (epoch - 1) * n_steps + step - 1, config.epochs * n_steps)
            weights.append(ctm_w)
            if mine or not global_clips:  # a rank with no clip in this step only joins the all-reduce
                fetch_started = time.perf_counter()
                batch: Batch = next(batches)
                waited += time.perf_counter() - fetch_started
                batch = batch.to(device, non_blocking=True)
                mixup = draw_mixup(len(batch), config.mixup_alpha, config.seed, epoch, step, ctx.rank) if config.mixup_alpha > 0 else None
                if mixup is not None:
                    batch = mix_batch(batch, *mixup)
                with autocast(device):
                    output = model(batch)
                total, ce, ctm = _objective(model, output, batch.labels, ctm_w, mixup)
                if not torch.isfinite(total):
                    raise FloatingPointError(f"non-finite loss {float(total)} at epoch {epoch} step {step} (clips {batch.clip_ids[:4]})")
                # This rank's share of the global batch's mean loss: summed over ranks it is that mean.
                (total * (mine / global_clips) if ctx.enabled else total).backward()
                loss_value = float(total.detach())  # synchronises a GPU step before the next fetch is timed
                sums += np.array([loss_value, ce, ctm, 1.0]) * len(batch)
            dist.allreduce_gradients(params, ctx)
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update(model)
            if report:
                report(ProgressEvent("step", epoch, last_epoch, step=step, steps=n_steps, loss=loss_value))
        train_s = time.perf_counter() - started
        loss_sum, ce_sum, ctm_sum, count = dist.allreduce_sum(sums.tolist(), ctx)
        wait_share = dist.allreduce_max(waited / train_s if train_s > 0 else 0.0, ctx)  # the rank that waited most
        # Each rank updated its own BatchNorm statistics: made to agree, so every rank validates, goes on from and
        # resumes from what rank 0 saves (distributed.average_batchnorm_statistics).
        dist.average_batchnorm_statistics(model, ctx)
        # With train.ema_decay the averaged weights are validated and checkpointed; the raw ones come back after.
        swapped = average.swapped_in(model) if average is not None else nullcontext({})
        with swapped as raw_weights:
            if average is not None:
                # The average's statistics too: each rank averaged its own. Its shadow keeps them per rank, but the
                # average is linear, so the mean over ranks of the shadows is what a resumed run (all ranks from rank
                # 0's saved mean) computes next, up to rounding (tests/modeling/training/test_distributed.py).
                dist.average_batchnorm_statistics(model, ctx)
            val_wa = val_uar = val_macro_f1 = val_loss = math.nan  # a refit has no validation speakers
            if val_loader is not None:
                val_metrics, val_loss = evaluate(model, val_loader, device, n_classes, ctx)
                val_wa, val_uar, val_macro_f1 = val_metrics.wa, val_metrics.uar, val_metrics.macro_f1
            record = EpochRecord(
                epoch=epoch,
                train_loss=loss_sum / count,
                train_ce=ce_sum / count,
                train_ctm=ctm_sum / count,
                val_loss=val_loss,
                val_wa=val_wa,
                val_uar=val_uar,
                val_macro_f1=val_macro_f1,
                lr=optimizer.param_groups[0]["lr"],
                seconds=time.perf_counter() - started,
                train_clips_per_s=count / train_s if train_s > 0 else 0.0,
                data_wait_share=wait_share,
                ctm_weight=float(np.mean(weights)) if weights else math.nan,
            )
            history.append(record)
            if val_loader is None:  # a refit chooses nothing: its model is that of its last epoch, written once
                improved = epoch == last_epoch
                best_uar, best_epoch = (math.nan, epoch) if improved else (best_uar, best_epoch)
            elif record.val_uar > best_uar:  # the gathered metrics: every rank decides alike
                improved, best_uar, best_epoch, bad_epochs = True, record.val_uar, epoch, 0
            else:
                improved, bad_epochs = False, bad_epochs + 1
            if ctx.is_main:
                payload = {
                    **checkpoint_meta,
                    "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "train_config": config.to_dict(),
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best_metric": best_uar,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "history": [asdict(r) for r in history],
                    "rng": capture_rng(),
                }
                if average is not None:
                    # state_dict above is the average (what is tested and shipped); the raw weights resume the optimiser
                    payload["raw_state_dict"] = {k: v.cpu() for k, v in raw_weights.items()}
                    payload["weight_average_updates"] = average.updates
                if improved:  # best.pt is what ships (MLflow artifact): the raw weights only resume, from last.pt
                    save_checkpoint(best_path, {k: v for k, v in payload.items() if k != "raw_state_dict"})
                save_checkpoint(last_path, payload)  # last: a kill after this line resumes at epoch + 1
        dist.barrier(ctx)  # no rank reads a checkpoint (resume, test) before rank 0 has written it
        if report:
            report(ProgressEvent("epoch_end", epoch, last_epoch, steps=n_steps, record=record))
        if bad_epochs >= config.patience:
            stopped_early = True
            break
    epochs_run = history[-1].epoch if history else 0
    return TrainResult(
        best_epoch=best_epoch,
        best_val_uar=best_uar,
        epochs_run=epochs_run,
        stopped_early=stopped_early or (bad_epochs >= config.patience and epochs_run < config.epochs),
        history=history,
        best_path=best_path if best_path.exists() else None,
        last_path=last_path if last_path.exists() else None,
    )
