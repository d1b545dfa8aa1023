"""Seed ensembles (``train.members = N``): a fold trains its recipe N times and ships the members' mean.

Member 0 is the fold's usual training (``fold_dir/best.pt``, seed ``train.seed``). Member k >= 1 trains
the same recipe on the same fold in ``fold_dir/members/k`` with seed ``train.seed + k``: its initial
weights, crops, SpecAugment masks, batch order and dropout are those of a standalone run with
``train.seed = seed + k`` on the same machine and thread count (its loaders are new, as that run's are, and
share the fold's clip cache when they read in this process, which changes no value). Each member's epoch is
chosen on the fold's validation speakers, as one model's is; test speakers are never read here. With loader
workers, the fold's first training loader keeps its persistent workers (and their clip caches) while the
members train.

The members' best checkpoints are written as one checkpoint, ``fold_dir/ensemble.pt``
(:func:`~modeling.training.checkpoint.ensemble_payload`), which loads as a
:class:`~modeling.network.ensemble.MemberEnsemble`: the fold tests, probes and ships that file. A killed fold
resumes member by member (each member's ``last.pt``).

Why: a small model trained from scratch on ~1,000 clips varies by a few points of UAR from seed to seed
(docs/results.md, the seed rows); averaging the class probabilities of a few seeds is the usual remedy, at N
times the training cost and N times the inference cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from modeling.training import distributed as dist
from modeling.training.metrics import compute_metrics
from modeling.training.train_loop import ProgressCallback, ProgressEvent, TrainConfig, TrainResult, predict, train_model

MEMBERS_DIR = "members"  # member k >= 1 trains in fold_dir / MEMBERS_DIR / str(k)
ENSEMBLE_FILE = "ensemble.pt"


def member_config(config: TrainConfig, k: int) -> TrainConfig:
    """Member k's training settings: the recipe with seed ``config.seed + k``."""
    return replace(config, seed=config.seed + k)


def train_members(
    first: TrainResult,
    initial_model: Callable[[TrainConfig], nn.Module],
    train_loader: DataLoader,
    val_loader: DataLoader,
    config: TrainConfig,
    fold_dir: Path,
    meta: dict[str, Any],
    device: Any,
    ctx: dist.DistContext = dist.SINGLE,
    progress: ProgressCallback | None = None,
    resume: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Train members 1..N-1 after ``first`` (member 0's result), write ``fold_dir / ENSEMBLE_FILE`` and return
    its path and the record FoldResult keeps: each member's seed, best epoch and validation UAR, and the
    ensemble's validation UAR. ``initial_model(member_config)`` builds a member's starting model (seeded).
    ``resume``: go on from a member's ``last.pt`` (``msata train``); False trains every member afresh."""
    from modeling.data.dataset import reseeded

    if config.members < 2:
        raise ValueError(f"train_members needs train.members >= 2, got {config.members}")
    if first.best_path is None:
        raise ValueError(f"member 0 in {fold_dir} has no best checkpoint")
    results = [first]
    for k in range(1, config.members):
        mine = member_config(config, k)

        def report(event: ProgressEvent, k: int = k) -> None:
            if progress:
                progress(replace(event, phase=f"member {k}"))

        result = train_model(
            initial_model(mine),
            reseeded(train_loader, mine.seed),
            reseeded(val_loader),  # never iterated, as a standalone run's (reseeded's docstring)
            mine,
            fold_dir / MEMBERS_DIR / str(k),
            meta,
            resume=resume,
            progress=report,
            ctx=ctx,
        )
        if result.best_path is None:
            raise RuntimeError(f"ensemble member {k} in {fold_dir} finished without a best checkpoint")
        results.append(result)
    return assemble_members(results, config, fold_dir, val_loader, device, len(meta["label_names"]), ctx)


def assemble_members(
    results: list[TrainResult],
    config: TrainConfig,
    fold_dir: Path,
    val_loader: DataLoader,
    device: Any,
    n_classes: int,
    ctx: dist.DistContext = dist.SINGLE,
) -> tuple[Path, dict[str, Any]]:
    """Write the trained members ``results`` (member k's at index k) as ``fold_dir / ENSEMBLE_FILE`` and score
    it on the validation loader; returns the path and the record FoldResult keeps. ``train_members`` calls it,
    and ``bench/gpu_ravdess.py --parallel-members`` with members trained as jobs of their own."""
    from modeling.training.checkpoint import ensemble_payload, load_checkpoint, load_trained_model, save_checkpoint

    if len(results) != config.members or any(r.best_path is None for r in results):
        raise ValueError(f"{fold_dir}: {len(results)} trained members for train.members = {config.members}")
    path = fold_dir / ENSEMBLE_FILE
    if ctx.is_main:
        save_checkpoint(path, ensemble_payload([load_checkpoint(r.best_path) for r in results]))
    dist.barrier(ctx)  # the other ranks read it next
    model, _, _ = load_trained_model(path, device)
    y, probs, _, _ = predict(model, val_loader, device, ctx)
    record = {
        "members": config.members,
        "seeds": [member_config(config, k).seed for k in range(config.members)],
        "best_epochs": [r.best_epoch for r in results],
        "val_uar_members": [r.best_val_uar for r in results],
        "val_uar_ensemble": compute_metrics(y, probs.argmax(axis=1), n_classes).uar,
    }
    return path, record


def member_metrics(record: dict[str, Any] | None) -> dict[str, float]:
    """The ensemble's figures as MLflow metrics of the fold's run (none for one model)."""
    if record is None:
        return {}
    scalars = {"ensemble_val_uar": float(record["val_uar_ensemble"])}
    scalars |= {f"member_{k}_best_val_uar": float(v) for k, v in enumerate(record["val_uar_members"])}
    scalars |= {f"member_{k}_best_epoch": float(v) for k, v in enumerate(record["best_epochs"])}
    return scalars | {f"test_first_member_{k}": float(v) for k, v in record.get("test_first_member", {}).items()}
