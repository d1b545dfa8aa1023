"""Rescore a finished run's fold models with other classifiers as the pooled probe (validation chooses; test reported).

For each fold of a finished ``msata train`` run with ``train.probe_weight`` (one model per fold, no refit), the fold's
``best.pt`` predicts its validation and test speakers, and the pooled statistics of the fold's clips (training clips
with their speed copies, as ``modeling.training.probe_fit`` fits them) are fitted by each probe classifier:

- ``logistic``: the run's own probe (``choose_probe``: L2 logistic regression, C on validation); the run's recorded
  validation and test figures as shipped must come out again here, or the bench stops;
- ``logistic balanced``: the same with ``class_weight="balanced"`` (C on validation over the same grid);
- ``lda``: linear discriminant analysis with Ledoit-Wolf shrinkage (``solver="lsqr", shrinkage="auto"``) on the same
  standardised statistics: no hyper-parameter, and a linear decision function, so it fits msata's ``PooledProbe``.

Each probe is mixed with the model as the run ships it (``train.probe_mix`` at ``train.probe_weight``), and each is
scored alone. Nothing here is chosen on test: compare on mean validation UAR (which also chose the model's epoch and
the logistic probes' C: optimistic figures).

    .venv/bin/python bench/probe_models.py RUN_DIR [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_variants import probe_logits  # noqa: E402

from modeling.network.pooled_probe import PooledProbe, mix_log_probs  # noqa: E402
from modeling.training.checkpoint import load_trained_model  # noqa: E402
from modeling.training.experiment_spec import load_spec  # noqa: E402
from modeling.training.fold_run import loaders  # noqa: E402
from modeling.training.metrics import compute_metrics, mean_std  # noqa: E402
from modeling.training.probe_fit import C_GRID, choose_probe, pooled_features  # noqa: E402
from modeling.training.train_loop import predict  # noqa: E402

PROBES = ("logistic", "logistic balanced", "lda")


def linear_probe(scaler: StandardScaler, coef: np.ndarray, intercept: np.ndarray, weight: float, mix: str) -> PooledProbe:
    return PooledProbe(
        torch.from_numpy(scaler.mean_), torch.from_numpy(scaler.scale_), torch.from_numpy(coef), torch.from_numpy(intercept), weight, mix
    )


def fit_lda(x: np.ndarray, y: np.ndarray, n_classes: int, weight: float, mix: str) -> PooledProbe:
    scaler = StandardScaler().fit(x)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(scaler.transform(x), y)
    if list(lda.classes_) != list(range(n_classes)):
        raise SystemExit(f"lda: the training clips show classes {list(lda.classes_)}, not all {n_classes}")
    return linear_probe(scaler, lda.coef_, lda.intercept_, weight, mix)


def fit_balanced(train, val, n_classes: int, weight: float, mix: str, seed: int) -> tuple[PooledProbe, float]:
    """The logistic probe with class_weight="balanced", its C chosen on the probe's validation UAR (first on a tie)."""
    scaler = StandardScaler().fit(train[0])
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed, class_weight="balanced")
        model.fit(scaler.transform(train[0]), train[1])
        probe = linear_probe(scaler, model.coef_, model.intercept_, weight, mix)
        uar = compute_metrics(val[1], probe_logits(probe, val[0]).argmax(axis=1), n_classes).uar
        if best is None or uar > best[0]:
            best = (uar, c, probe)
    return best[2], best[1]


def run(run_dir: Path) -> dict:
    spec = load_spec(run_dir)
    if spec.train.members > 1 or spec.train.refit or not spec.train.probe_weight:
        raise SystemExit(f"{run_dir}: this bench rescores runs of one model per fold with a pooled probe, without refit")
    weight, mix, n_classes = spec.train.probe_weight, spec.train.probe_mix, len(spec.label_names)
    per_fold = []
    for fold in spec.folds:
        started = time.time()
        _, val_loader, test_loader, make_loader = loaders(spec, fold, spec.train)
        model, _, _ = load_trained_model(run_dir / f"fold_{fold.index}" / "best.pt", "cpu")
        train = pooled_features(make_loader(fold.train_ids, False, 0, with_copies=True, cache=False))
        val = pooled_features(val_loader)
        own = choose_probe(train, val, n_classes, weight, spec.train.seed, mix=mix)
        balanced, c_balanced = fit_balanced(train, val, n_classes, weight, mix, spec.train.seed)
        probes = {"logistic": own.probe, "logistic balanced": balanced, "lda": fit_lda(*train, n_classes, weight, mix)}
        row: dict = {"fold": fold.index, "C": own.c, "C balanced": c_balanced}
        for split, loader in (("val", val_loader), ("test", test_loader)):
            y, probs, _, _ = predict(model, loader, torch.device("cpu"))
            x, y_probe = pooled_features(loader)
            if not np.array_equal(y, y_probe):
                raise SystemExit("the two passes over a loader disagree on its labels")
            model_logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, None)))
            row[f"{split} model"] = compute_metrics(y, probs.argmax(axis=1), n_classes).uar
            for name, probe in probes.items():
                scores = probe_logits(probe, x)
                mixed = mix_log_probs(model_logits, torch.from_numpy(scores), weight, mix).numpy()
                row[f"{split} {name}"] = compute_metrics(y, mixed.argmax(axis=1), n_classes).uar
                row[f"{split} {name} alone"] = compute_metrics(y, scores.argmax(axis=1), n_classes).uar
        recorded = json.loads((run_dir / f"fold_{fold.index}" / "result.json").read_text())
        for what, here, there in (
            ("validation UAR as shipped", row["val logistic"], recorded["probe"]["val_uar_mixed"]),
            ("test UAR as shipped", row["test logistic"], recorded["test"]["uar"]),
        ):
            if abs(here - there) > 1e-9:
                raise SystemExit(f"{run_dir}: fold {fold.index}'s {what} is {here} here, {there} in its run")
        row["seconds"] = round(time.time() - started, 1)
        per_fold.append(row)
        shown = ", ".join(f"{p} {row['val ' + p]:.3f}/{row['test ' + p]:.3f} (alone {row[f'val {p} alone']:.3f})" for p in PROBES)
        print(
            f"fold {fold.index}: model {row['val model']:.3f}/{row['test model']:.3f}; mixed with {shown} ({row['seconds']} s)", flush=True
        )
    summary = {}
    for key in ["model"] + [k for p in PROBES for k in (p, f"{p} alone")]:
        summary[key] = {"val_uar": float(np.mean([r[f"val {key}"] for r in per_fold]))}
        summary[key]["test_uar"] = dict(zip(("mean", "std"), mean_std([r[f"test {key}"] for r in per_fold]), strict=True))
    return {"run_dir": str(run_dir), "folds": per_fold, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.run_dir)
    print("| model and probe | validation UAR (mean) | test UAR (mean ± std) |")
    print("|---|---:|---:|")
    for key, e in result["summary"].items():
        label = key if key == "model" or key.endswith("alone") else f"model + {key} probe (as shipped)"
        print(f"| {label} | {e['val_uar']:.4f} | {e['test_uar']['mean']:.3f} ± {e['test_uar']['std']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
