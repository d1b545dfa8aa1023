"""Both arms of a finished ``train.refit`` run, as shipped, on its test speakers: before and after the refit.

A refit run (``msata train`` with ``[train] refit = true``) records the refitted model with its refitted probe (the
fold's test figure) and, as ``selection_test``, the model chosen on validation *alone*. What it does not record is the
pre-refit model *as the recipe ships it*: with its probe fitted on the training speakers only (C chosen on
validation), i.e. the same recipe without the refit. This bench computes it, and checks first that what it recomputes
of the run agrees with the run's record (the pre-refit model alone, the refit model alone and as shipped, the probe's
C), or stops.

With ``bench/nested_refit.py``'s inner folds the test speakers are the outer validation speakers, and the two arms'
difference is session 18's nested check (docs/measurements/s18-refit/design.md); on the real folds it is the refit's
effect on test, reported beside it.

    .venv/bin/python bench/refit_arms.py RUN_DIR [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_variants import probe_logits  # noqa: E402

from modeling.network.pooled_probe import mix_log_probs  # noqa: E402
from modeling.training.checkpoint import load_trained_model  # noqa: E402
from modeling.training.experiment_spec import load_spec  # noqa: E402
from modeling.training.fold_run import REFIT_DIR, loaders  # noqa: E402
from modeling.training.metrics import compute_metrics, mean_std  # noqa: E402
from modeling.training.probe_fit import choose_probe, pooled_features  # noqa: E402
from modeling.training.train_loop import predict  # noqa: E402

ARMS = ("pre-refit model", "pre-refit as shipped", "refit model", "refit as shipped")
TOLERANCE = 1e-9


def check(run_dir: Path, fold: int, what: str, here: float, there: float) -> None:
    if abs(here - there) > TOLERANCE:
        raise SystemExit(f"{run_dir}: fold {fold}'s {what} is {here} here, {there} in its run")


def score_fold(run_dir: Path, spec, fold) -> dict:
    weight, mix, n_classes, cpu = spec.train.probe_weight, spec.train.probe_mix, len(spec.label_names), torch.device("cpu")
    fold_dir = run_dir / f"fold_{fold.index}"
    recorded = json.loads((fold_dir / "result.json").read_text())
    _, val_loader, test_loader, make_loader = loaders(spec, fold, spec.train)
    train = pooled_features(make_loader(fold.train_ids, False, 0, with_copies=True, cache=False))
    own = choose_probe(train, pooled_features(val_loader), n_classes, weight, spec.train.seed, mix=mix)
    check(run_dir, fold.index, "probe C", own.c, recorded["probe"]["C"])
    x, y_probe = pooled_features(test_loader)
    metrics = {}
    pre, _, _ = load_trained_model(fold_dir / "best.pt", cpu)
    y, probs, _, _ = predict(pre, test_loader, cpu)
    if not np.array_equal(y, y_probe):
        raise SystemExit("the two passes over the test loader disagree on its labels")
    metrics["pre-refit model"] = compute_metrics(y, probs.argmax(axis=1), n_classes)
    model_logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, None)))
    mixed = mix_log_probs(model_logits, torch.from_numpy(probe_logits(own.probe, x)), weight, mix).numpy()
    metrics["pre-refit as shipped"] = compute_metrics(y, mixed.argmax(axis=1), n_classes)
    for arm, path in (("refit model", fold_dir / REFIT_DIR / "best.pt"), ("refit as shipped", fold_dir / "probed.pt")):
        model, _, _ = load_trained_model(path, cpu)
        y_arm, probs, _, _ = predict(model, test_loader, cpu)
        metrics[arm] = compute_metrics(y_arm, probs.argmax(axis=1), n_classes)
    check(run_dir, fold.index, "pre-refit model's test UAR", metrics["pre-refit model"].uar, recorded["selection_test"]["uar"])
    check(run_dir, fold.index, "refit model's test UAR", metrics["refit model"].uar, recorded["probe"]["test_model"]["uar"])
    check(run_dir, fold.index, "test UAR as shipped", metrics["refit as shipped"].uar, recorded["test"]["uar"])
    return {"fold": fold.index, "test_speakers": list(fold.test_speakers), "C": own.c} | {arm: m.scalars() for arm, m in metrics.items()}


def run(run_dir: Path) -> dict:
    spec = load_spec(run_dir)
    if not (spec.train.refit and spec.train.probe_weight) or spec.train.members > 1:
        raise SystemExit(f"{run_dir}: this bench scores train.refit runs of one model per fold with a pooled probe")
    per_fold = []
    for fold in spec.folds:
        started = time.time()
        row = score_fold(run_dir, spec, fold)
        per_fold.append(row)
        shown = ", ".join(f"{arm} {row[arm]['uar']:.3f}" for arm in ARMS)
        print(f"fold {fold.index} (test {' '.join(fold.test_speakers)}): {shown} ({time.time() - started:.0f} s)", flush=True)
    summary = {
        arm: {k: dict(zip(("mean", "std"), mean_std([r[arm][k] for r in per_fold]), strict=True)) for k in ("wa", "uar", "macro_f1")}
        for arm in ARMS
    }
    gain = [r["refit as shipped"]["uar"] - r["pre-refit as shipped"]["uar"] for r in per_fold]
    return {
        "run_dir": str(run_dir),
        "folds": per_fold,
        "summary": summary,
        "refit_gain_uar": {"per_fold": gain, "mean": float(np.mean(gain))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.run_dir)
    print("| arm | WA | UAR | macro-F1 |")
    print("|---|---:|---:|---:|")
    for arm, e in result["summary"].items():
        print("| " + arm + " | " + " | ".join(f"{e[k]['mean']:.3f} ± {e[k]['std']:.3f}" for k in ("wa", "uar", "macro_f1")) + " |")
    gain = result["refit_gain_uar"]
    print(
        f"refit as shipped - pre-refit as shipped, UAR: mean {gain['mean']:+.4f}; per fold "
        + " ".join(f"{g:+.3f}" for g in gain["per_fold"])
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
