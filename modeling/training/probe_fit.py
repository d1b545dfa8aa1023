"""Fitting the pooled-statistics probe of a fold (``train.probe_weight``; the probe is in
``modeling/network/pooled_probe.py``).

After the fold's model is chosen on validation, a standardised logistic regression (scikit-learn,
L2, lbfgs) is fitted on the pooled audio statistics of the fold's training clips (with their
speed copies when ``[data] speed_copies`` is set), its C is chosen among :data:`C_GRID` by the
probe's own UAR on the validation speakers, and with ``train.refit`` it is fitted again on
training + validation speakers at that C. The mixing weight and form (``train.probe_mix``) are the
config's, never tuned here.
The statistics come from the fold's loaders in evaluation mode (no augmentation; whole clips unless
``train.eval_max_duration_s`` crops them, as for validation),
through the same :func:`~modeling.network.pooled_probe.pooled_statistics` the model applies at
inference. This is the floor of ``bench/pooled_baselines.py`` ("all layers" view) made part of
the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from modeling.network.pooled_probe import PooledProbe, pooled_statistics
from modeling.training import distributed as dist
from modeling.training.metrics import compute_metrics

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

C_GRID = (0.01, 0.1, 1.0, 10.0)  # the floor's grid (bench/pooled_baselines.py)
# Logit given to a class the training clips never showed: its probability is ~0 and the others unchanged.
ABSENT_CLASS_LOGIT = -1e4


@dataclass
class ProbeChoice:
    probe: PooledProbe
    c: float
    val_uar: float  # the probe alone on the validation speakers, at the chosen C
    n_train: int  # clips it was finally fitted on

    def record(self) -> dict[str, Any]:
        return {"C": self.c, "weight": self.probe.weight, "mix": self.probe.mix_kind, "probe_val_uar": self.val_uar, "n_fit": self.n_train}


@torch.no_grad()
def pooled_features(loader: DataLoader, ctx: dist.DistContext = dist.SINGLE) -> tuple[np.ndarray, np.ndarray]:
    """(statistics (N, 2F'), labels (N,)) over a loader's clips that hold audio (the probe never sees
    the others: :meth:`PooledProbe.mix` leaves them to the model), every rank getting the whole set in
    the dataset's order (as ``train_loop.predict``)."""
    stats, labels = [], []
    for batch in loader:
        has_audio = batch.audio_mask.any(dim=1).numpy()  # (B,)
        stats.extend(pooled_statistics(batch.audio, batch.audio_mask).numpy()[has_audio])
        labels.extend(batch.labels.numpy()[has_audio])
    if ctx.enabled:
        parts = dist.gather_objects((stats, labels), ctx)
        stats, labels = (dist.interleave([part[k] for part in parts]) for k in range(2))
    if not stats:
        raise ValueError("pooled_features(): no clip of the loader holds audio")
    return np.stack(stats), np.asarray(labels, dtype=np.int64)


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, c: float, weight: float, seed: int, mix: str = "mean") -> PooledProbe:
    """A standardised L2 logistic regression as a :class:`PooledProbe` over all ``n_classes``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y)) < 2:
        raise ValueError(f"a pooled probe needs at least two classes among its {len(y)} training clips")
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(scaler.transform(x), y)
    coef = np.zeros((n_classes, x.shape[1]), dtype=np.float64)
    intercept = np.full(n_classes, ABSENT_CLASS_LOGIT, dtype=np.float64)
    classes = model.classes_.astype(int)
    if len(classes) == 2:  # binary: sklearn keeps one row, the logit of classes[1] against classes[0]
        coef[classes[1]], intercept[classes[1]], intercept[classes[0]] = model.coef_[0], model.intercept_[0], 0.0
    else:
        coef[classes], intercept[classes] = model.coef_, model.intercept_
    return PooledProbe(
        torch.from_numpy(scaler.mean_), torch.from_numpy(scaler.scale_), torch.from_numpy(coef), torch.from_numpy(intercept), weight, mix
    )


def probe_predictions(probe: PooledProbe, x: np.ndarray) -> np.ndarray:
    """Class indices the probe alone predicts for pooled statistics (N, 2F')."""
    with torch.no_grad():
        return probe.logits_of(torch.from_numpy(x)).argmax(dim=1).numpy()


def choose_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    weight: float,
    seed: int,
    refit_on: tuple[np.ndarray, np.ndarray] | None = None,
    c_grid: tuple[float, ...] = C_GRID,
    mix: str = "mean",
) -> ProbeChoice:
    """C by the probe's validation UAR (the first C on a tie), then, given ``refit_on``, fitted again on it."""
    best: tuple[float, float, PooledProbe] | None = None
    for c in c_grid:
        probe = fit_logistic(*train, n_classes, c, weight, seed, mix)
        uar = compute_metrics(val[1], probe_predictions(probe, val[0]), n_classes).uar
        if best is None or uar > best[0]:
            best = (uar, c, probe)
    assert best is not None, "c_grid is empty"
    uar, c, probe = best
    fitted_on = train
    if refit_on is not None:
        probe, fitted_on = fit_logistic(*refit_on, n_classes, c, weight, seed, mix), refit_on
    return ProbeChoice(probe=probe, c=c, val_uar=uar, n_train=len(fitted_on[1]))
