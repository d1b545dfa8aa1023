"""One training run in plain PyTorch (no Prefect, no MLflow): fit, evaluate, resume.

AdamW, linear warm-up then cosine decay (per step), CE + lambda * CTM, gradient
clipping, bf16 autocast on CUDA (fp32 on CPU), early stopping on validation UAR.
After every epoch ``last.pt`` is written atomically, and ``best.pt`` whenever the
validation UAR strictly improves. ``resume=True`` continues from ``last.pt`` with
model, optimiser, scheduler, early-stopping counters, history and RNG states; the
data order and augmentation are functions of (seed, epoch, index), so a resumed run
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from modeling.batch import Batch
from modeling.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from modeling.data import DataConfig, EpochSampler
from modeling.metrics import ClassificationMetrics, compute_metrics


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0  # linear warm-up length; cosine decay to 0 afterwards
    encoder_lr_scale: float = 0.1  # fine-tuned pretrained blocks train at lr * this (they start near a good solution)
    lambda_ctm: float = 0.1  # weight of the cross-temporal matching loss
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    patience: int = 8  # epochs without a validation-UAR improvement before stopping
    max_duration_s: float = 4.0  # training crop length
    eval_max_duration_s: float | None = None  # None = whole clip at eval
    augment: bool = True
    in_memory: bool = True
    speaker_norm: bool = False  # transductive per-speaker standardisation of the audio (see DataConfig)
    num_workers: int = 2
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def data_config(self) -> DataConfig:
        return DataConfig(
            max_duration_s=self.max_duration_s,
            eval_max_duration_s=self.eval_max_duration_s,
            augment=self.augment,
            in_memory=self.in_memory,
            speaker_norm=self.speaker_norm,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TrainConfig":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {sorted(unknown)}; known: {sorted(known)}")
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


@dataclass
class ProgressEvent:
    """What a progress callback receives. kind: "epoch_start" | "step" | "epoch_end"."""

    kind: str
    epoch: int
    epochs: int
    step: int = 0
    steps: int = 0
    loss: float | None = None
    record: EpochRecord | None = None
    fold: int | None = None  # set by the cross-validation driver


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


def _autocast(device: torch.device) -> torch.autocast:
    # bf16 needs no loss scaling; CPU stays in fp32 (CPU bf16 is slow and lossy here).
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _objective(model: nn.Module, output: Any, labels: torch.Tensor, lambda_ctm: float) -> tuple[torch.Tensor, float, float]:
    """(total, ce, ctm) from modeling.losses.training_objective, with the model's CTM head and widths."""
    from modeling.losses import training_objective

    cfg = getattr(model, "config", None)
    kwargs = {"projector": model.ctm_head, "sigma": cfg.ctm_sigma, "tau": cfg.ctm_tau} if cfg is not None and hasattr(model, "ctm_head") else {}
    result = training_objective(output, labels, lambda_ctm, **kwargs)
    return result.total, float(result.ce.detach()), float(result.ctm.detach())


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """(labels (N,), probabilities (N, C), clip ids, mean CE) over a loader, in eval mode."""
    model.eval()
    labels, probs, ids, ce_sum = [], [], [], 0.0
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(batch).logits.float()  # (B, C)
        if (batch.labels >= 0).all():
            ce_sum += float(nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        labels.append(batch.labels.cpu().numpy())
        probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
        ids.extend(batch.clip_ids)
    if not ids:
        raise ValueError("predict() got an empty loader")
    y = np.concatenate(labels)
    return y, np.concatenate(probs), ids, ce_sum / len(y)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, n_classes: int) -> tuple[ClassificationMetrics, float]:
    y, p, _, loss = predict(model, loader, device)
    return compute_metrics(y, p.argmax(axis=1), n_classes), loss


def train_model(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    config: TrainConfig,
    out_dir: str | Path,
    checkpoint_meta: dict[str, Any],
    resume: bool = False,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train with early stopping on validation UAR; checkpoints go to ``out_dir``.

    ``checkpoint_meta`` holds the inference half of the checkpoint format:
    model_config, feature_config, label_names.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    device = resolve_device(config.device)
    n_classes = len(checkpoint_meta["label_names"])
    seed_everything(config.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    n_steps = len(train_loader)
    schedule = warmup_cosine(config.epochs * n_steps, int(round(config.warmup_epochs * n_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    start_epoch, best_uar, best_epoch, bad_epochs, history = 1, -math.inf, 0, 0, []
    if resume and last_path.exists():
        state = load_checkpoint(last_path, map_location=device, require_resume=True)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best_uar = float(state["best_metric"])
        best_epoch, bad_epochs = int(state.get("best_epoch", 0)), int(state.get("bad_epochs", 0))
        history = [EpochRecord(**r) for r in state.get("history", [])]
        restore_rng(state["rng"])
        if bad_epochs >= config.patience:  # it had already stopped early
            start_epoch = config.epochs + 1

    sampler = train_loader.sampler
    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs + 1):
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch)
        if progress:
            progress(ProgressEvent("epoch_start", epoch, config.epochs, steps=n_steps))
        model.train()
        started = time.perf_counter()
        sums = np.zeros(3)
        count = 0
        waited = 0.0
        fetch_started = time.perf_counter()
        for step, batch in enumerate(train_loader, start=1):
            waited += time.perf_counter() - fetch_started
            batch: Batch = batch.to(device, non_blocking=True)
            with _autocast(device):
                output = model(batch)
            total, ce, ctm = _objective(model, output, batch.labels, config.lambda_ctm)
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss {float(total)} at epoch {epoch} step {step} (clips {batch.clip_ids[:4]})")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            sums += np.array([float(total.detach()), ce, ctm]) * len(batch)
            count += len(batch)
            if progress:
                progress(ProgressEvent("step", epoch, config.epochs, step=step, steps=n_steps, loss=float(total.detach())))
            fetch_started = time.perf_counter()  # the float() reads above synchronise a GPU step
        train_s = time.perf_counter() - started
        val_metrics, val_loss = evaluate(model, val_loader, device, n_classes)
        record = EpochRecord(
            epoch=epoch,
            train_loss=float(sums[0] / count),
            train_ce=float(sums[1] / count),
            train_ctm=float(sums[2] / count),
            val_loss=val_loss,
            val_wa=val_metrics.wa,
            val_uar=val_metrics.uar,
            val_macro_f1=val_metrics.macro_f1,
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - started,
            train_clips_per_s=count / train_s if train_s > 0 else 0.0,
            data_wait_share=waited / train_s if train_s > 0 else 0.0,
        )
        history.append(record)
        improved = record.val_uar > best_uar
        if improved:
            best_uar, best_epoch, bad_epochs = record.val_uar, epoch, 0
        else:
            bad_epochs += 1
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
        if improved:
            save_checkpoint(best_path, payload)
        save_checkpoint(last_path, payload)  # last: a kill after this line resumes at epoch + 1
        if progress:
            progress(ProgressEvent("epoch_end", epoch, config.epochs, steps=n_steps, record=record))
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
