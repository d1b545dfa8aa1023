"""Atomic training checkpoints that load without running code (format in docs/architecture.md).

A checkpoint is one ``torch.save`` dict. It is written to a temporary file in the
same directory and moved into place with ``os.replace`` so a reader (or a resumed
run after SIGKILL) sees either the previous complete file or the new one, never a
torn write. Inference needs only ``model_config``, ``feature_config``,
``label_names`` and ``state_dict`` (:func:`model_from_checkpoint` builds the model from
them, for training and inference alike); the rest is for resuming.

Users download and share checkpoints, and unpickling arbitrary objects runs code.
So a checkpoint holds only tensors and plain data (dicts, lists, tuples, str,
int, float, bool, None): :func:`save_checkpoint` turns numpy values into Python
scalars or tensors and refuses anything else, and :func:`load_checkpoint` reads
with ``torch.load(weights_only=True)`` and refuses any file that needs more. A
checkpoint written by an older msata (numpy RNG state inside) can be converted,
once, with :func:`upgrade_checkpoint` if you trust where it came from.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from features.config import FeatureConfig
    from modeling.network.encoder import MsataModel
    from modeling.network.ensemble import MemberEnsemble

REQUIRED_KEYS = ("model_config", "feature_config", "label_names", "state_dict")
RESUME_KEYS = ("train_config", "epoch", "optimizer", "scheduler", "best_metric", "rng")
# train.members > 1: the other members' state dicts (members 1..N-1; member 0's is "state_dict"), one model config
MEMBERS_KEY = "member_state_dicts"
# what a training checkpoint holds for resuming only: an ensemble checkpoint leaves them out (it keeps train_config,
# which inference reads: crop length, speaker normalisation)
TRAINING_ONLY_KEYS = (
    *(k for k in RESUME_KEYS if k != "train_config"),
    *("raw_state_dict", "weight_average_updates", "history", "best_epoch", "bad_epochs", MEMBERS_KEY),
)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or lacks required fields."""


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as plain data and tensors."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = np.asarray(numpy_state["key"], dtype=np.uint32)
        np.random.set_state((numpy_state["bit_generator"], key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    else:  # the tuple of np.random.get_state(), as upgrade_checkpoint keeps it (its key array became a tensor)
        name, key, *rest = numpy_state
        np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


_PLAIN = (str, int, float, bool, bytes, type(None), torch.dtype, torch.device, torch.Size)


def plain_data(value: Any, where: str = "payload") -> Any:
    """``value`` with numpy scalars/arrays as Python scalars/tensors; CheckpointError for anything
    ``torch.load(weights_only=True)`` would not read back (``where`` names the offending entry)."""
    if isinstance(value, np.generic):  # before _PLAIN: np.float64 is a float subclass, pickled as numpy
        return value.item()
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, dict):
        out = OrderedDict() if isinstance(value, OrderedDict) else {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"cannot save {where}: key {key!r} is a {type(key).__name__}, not a str or int")
            out[key] = plain_data(item, f"{where}[{key!r}]")
        if hasattr(value, "_metadata"):  # module state dicts carry per-module versions
            out._metadata = plain_data(value._metadata, f"{where}._metadata")  # type: ignore[attr-defined]
        return out
    if isinstance(value, (list, tuple)):
        items = [plain_data(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    kind = "function" if callable(value) and not isinstance(value, type) else type(value).__name__
    raise CheckpointError(
        f"cannot save {where}: {where} is a {kind}, and checkpoints hold only tensors and plain data (dict, list, tuple, str, int, float, bool, None)"
    )


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` to ``path`` (tmp file in the same dir + os.replace)."""
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint for {path} lacks required keys {missing}")
    payload = plain_data(payload)  # before any file is touched: a refused payload leaves the old file as it was
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


def _unpickler_reason(err: Exception) -> str:
    """The one informative line of torch's multi-line weights_only error."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it needs {found.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    hit = next((line for line in lines if "Unsupported" in line), lines[-1] if lines else type(err).__name__)
    return hit.split(". ")[0]


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: never unpickles anything but tensors and plain data.

    A file that is not a ``torch.save`` zip archive (e.g. a raw pickle) is refused
    before it is opened as a pickle; one that needs other objects is refused by
    torch's restricted unpickler. Both raise a one-line CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a torch.save archive (msata checkpoints are; raw pickles are never loaded)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it holds Python objects beyond tensors and plain data ({_unpickler_reason(err)}), "
            "and loading those could run code; if you wrote it yourself with an older msata, convert it with modeling.training.checkpoint.upgrade_checkpoint"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {_unpickler_reason(err)}") from err


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", require_resume: bool = False) -> dict[str, Any]:
    payload = safe_torch_load(path, map_location)
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a dict")
    wanted = REQUIRED_KEYS + (RESUME_KEYS if require_resume else ())
    missing = [k for k in wanted if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}")
    return payload


def upgrade_checkpoint(src: str | Path, dst: str | Path, *, trust_source: bool) -> Path:
    """Rewrite a checkpoint from an older msata (numpy objects inside) as plain data.

    This is the one place that unpickles arbitrary objects, so it runs only with
    ``trust_source=True``: use it on files you or your own registry wrote, never on
    a downloaded one.
    """
    if not trust_source:
        raise CheckpointError(
            f"not upgrading {src}: unpickling it could run code; pass trust_source=True only for a file you wrote yourself"
        )
    payload = torch.load(Path(src), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {src} holds a {type(payload).__name__}, not a dict")
    return save_checkpoint(dst, payload)


def model_from_checkpoint(payload: dict[str, Any], device: str | torch.device = "cpu", source: str = "") -> MsataModel | MemberEnsemble:
    """The trained model of a loaded checkpoint dict, in eval mode on ``device``.

    The one place a model is built from a checkpoint (:func:`load_trained_model` and
    ``Predictor.from_checkpoint`` both call it): the config, strict weights, and a label
    list that agrees with the classifier. A checkpoint with :data:`MEMBERS_KEY` (``train.members``)
    gives a :class:`~modeling.network.ensemble.MemberEnsemble`. ``source`` names the checkpoint in errors."""
    from modeling.network.encoder import MsataConfig, MsataModel
    from modeling.network.ensemble import MemberEnsemble
    from modeling.network.pooled_probe import CHECKPOINT_KEY, PooledProbe

    config = MsataConfig.from_dict(payload["model_config"])
    more = payload.get(MEMBERS_KEY) or []
    if not isinstance(more, list) or not all(isinstance(sd, dict) for sd in more):
        raise CheckpointError(f"checkpoint {source}: {MEMBERS_KEY} must be a list of state dicts")
    members = []
    for k, state_dict in enumerate([payload["state_dict"], *more]):
        member = MsataModel(config)
        try:
            member.load_state_dict(state_dict)
        except RuntimeError as err:
            raise CheckpointError(
                f"checkpoint {source}: member {k}'s weights do not fit its model config: {str(err).splitlines()[0]}"
            ) from err
        members.append(member)
    model = members[0] if len(members) == 1 else MemberEnsemble(members)
    if payload.get(CHECKPOINT_KEY) is not None:  # train.probe_weight: the fitted probe travels beside the state dict
        try:
            model.attach_probe(PooledProbe.from_checkpoint(payload[CHECKPOINT_KEY], source))
        except ValueError as err:
            raise CheckpointError(f"checkpoint {source}: {err}") from err
    n_labels = len(payload["label_names"])
    if n_labels != config.n_classes:
        raise CheckpointError(f"checkpoint {source}: {n_labels} label names for {config.n_classes} classes")
    return model.to(device).eval()


def ensemble_payload(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """One checkpoint dict for the models of ``payloads`` (each a trained checkpoint of one recipe): the first's
    inference fields, member 0's weights as ``state_dict``, the others under :data:`MEMBERS_KEY`. Resume state is
    left out: an ensemble is shipped and tested, never trained further."""
    if len(payloads) < 2:
        raise CheckpointError(f"an ensemble checkpoint needs at least two members, got {len(payloads)}")
    from modeling.network.pooled_probe import CHECKPOINT_KEY

    first = payloads[0]
    for k, payload in enumerate(payloads):
        for key in ("model_config", "feature_config", "label_names"):
            if payload[key] != first[key]:
                raise CheckpointError(f"ensemble member {k}'s {key} differs from member 0's: members must be one recipe on one store")
        if payload.get(MEMBERS_KEY):
            raise CheckpointError(f"ensemble member {k} is itself an ensemble")
        if payload.get(CHECKPOINT_KEY) is not None:
            raise CheckpointError(
                f"ensemble member {k} carries a pooled probe: members are models as trained, the probe is fitted on the ensemble"
            )
    kept = {k: v for k, v in first.items() if k not in TRAINING_ONLY_KEYS}
    return kept | {MEMBERS_KEY: [p["state_dict"] for p in payloads[1:]]}


def load_trained_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MsataModel | MemberEnsemble, FeatureConfig, list[str]]:
    """(model in eval mode on ``device``, its feature config, label names) from a checkpoint file."""
    from features.config import FeatureConfig

    payload = load_checkpoint(path, map_location=device)
    model = model_from_checkpoint(payload, device, source=str(path))
    return model, FeatureConfig.from_dict(payload["feature_config"]), list(payload["label_names"])
