"""Atomic training checkpoints (format in docs/architecture.md).

A checkpoint is one ``torch.save`` dict. It is written to a temporary file in the
same directory and moved into place with ``os.replace`` so a reader (or a resumed
run after SIGKILL) sees either the previous complete file or the new one, never a
torn write. Inference needs only ``model_config``, ``feature_config``,
``label_names`` and ``state_dict``; the rest is for resuming.

Checkpoints hold Python objects (configs, RNG states), so they are loaded with
``weights_only=False``: only load checkpoints you (or your MLflow registry) wrote.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from features.config import FeatureConfig

REQUIRED_KEYS = ("model_config", "feature_config", "label_names", "state_dict")
RESUME_KEYS = ("train_config", "epoch", "optimizer", "scheduler", "best_metric", "rng")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or lacks required fields."""


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` to ``path`` (tmp file in the same dir + os.replace)."""
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint for {path} lacks required keys {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no half-written temp file behind, then let the error propagate.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", require_resume: bool = False) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    wanted = REQUIRED_KEYS + (RESUME_KEYS if require_resume else ())
    missing = [k for k in wanted if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}")
    return payload


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, "FeatureConfig", list[str]]:
    """(model in eval mode on ``device``, its feature config, label names) from a checkpoint."""
    from features.config import FeatureConfig
    from modeling.encoder import MsataConfig, MsataModel

    payload = load_checkpoint(path, map_location=device)
    model = MsataModel(MsataConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return model, FeatureConfig.from_dict(payload["feature_config"]), list(payload["label_names"])
