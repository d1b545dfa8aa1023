"""Ways of combining a finished run's fold models with the pooled probe, scored on validation (and test, reported).

For each fold of a finished ``msata train`` run directory, the fold's ``best.pt`` (the model chosen on
validation, without any probe) predicts its validation and test speakers, the pooled probe of
``train.probe_weight`` is fitted as training fits it (``modeling.training.probe_fit.choose_probe``: C on
validation), and these combinations are scored:

- ``model``: the model alone; ``probe``: the probe alone;
- ``mean``: ``0.5 p_model + 0.5 p_probe``, what ``probe_weight = 0.5`` ships;
- ``geometric``: ``softmax(0.5 log p_model + 0.5 log p_probe)``;
- ``calibrated mean``: each member's logits divided by the temperature that minimises its cross-entropy
  on the validation speakers (Guo et al., 2017), then the mean.

Nothing here is chosen on test: the combinations are compared on mean validation UAR (which also chose
the model's epoch, the probe's C and, for ``calibrated mean``, the temperatures: an optimistic figure),
and test is printed beside for the record.

    .venv/bin/python bench/probe_variants.py RUN_DIR [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.special
import torch
from scipy.optimize import minimize_scalar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.training.checkpoint import load_trained_model  # noqa: E402
from modeling.training.experiment_spec import load_spec  # noqa: E402
from modeling.training.fold_run import loaders  # noqa: E402
from modeling.training.metrics import compute_metrics, mean_std  # noqa: E402
from modeling.training.probe_fit import choose_probe, pooled_features  # noqa: E402
from modeling.training.train_loop import predict  # noqa: E402

VARIANTS = ("model", "probe", "mean", "geometric", "calibrated mean")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return scipy.special.log_softmax(logits, axis=1)


def temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising the mean cross-entropy of softmax(logits / T) on (logits, y)."""

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t))[np.arange(len(y)), y].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x))


def combine(model_logits: np.ndarray, probe_logits: np.ndarray, temperatures: tuple[float, float]) -> dict[str, np.ndarray]:
    """variant -> (N, C) scores whose argmax is that variant's prediction."""
    lm, lp = log_softmax(model_logits), log_softmax(probe_logits)
    cm, cp = log_softmax(model_logits / temperatures[0]), log_softmax(probe_logits / temperatures[1])
    return {
        "model": lm,
        "probe": lp,
        "mean": 0.5 * np.exp(lm) + 0.5 * np.exp(lp),
        "geometric": 0.5 * lm + 0.5 * lp,
        "calibrated mean": 0.5 * np.exp(cm) + 0.5 * np.exp(cp),
    }


def probe_logits(probe, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return probe.logits_of(torch.from_numpy(x)).numpy()


def run(run_dir: Path) -> dict:
    spec = load_spec(run_dir)
    if spec.train.members > 1:  # its best.pt is member 0 only, not what the run ships
        raise SystemExit(f"{run_dir}: a train.members = {spec.train.members} run; this bench rescores runs of one model each")
    n_classes = len(spec.label_names)
    device = torch.device("cpu")
    per_fold = []
    for fold in spec.folds:
        started = time.time()
        _, val_loader, test_loader, make_loader = loaders(spec, fold, spec.train)
        model, _, _ = load_trained_model(run_dir / f"fold_{fold.index}" / "best.pt", device)
        train_clips = pooled_features(make_loader(fold.train_ids, False, 0, with_copies=True, cache=False))
        choice = choose_probe(train_clips, pooled_features(val_loader), n_classes, 0.5, spec.train.seed)
        parts = {}
        for name, loader in (("val", val_loader), ("test", test_loader)):
            y, probs, _, _ = predict(model, loader, device)
            x, y_probe = pooled_features(loader)
            assert np.array_equal(y, y_probe), "the two passes over a loader disagree on its labels"
            parts[name] = (y, np.log(np.clip(probs, 1e-12, None)), probe_logits(choice.probe, x))
        y_val, model_val, probe_val = parts["val"]
        temps = (temperature(model_val, y_val), temperature(probe_val, y_val))
        row = {"fold": fold.index, "C": choice.c, "temperatures": temps, "seconds": round(time.time() - started, 1)}
        for name, (y, model_logits, probe_part) in parts.items():
            for variant, scores in combine(model_logits, probe_part, temps).items():
                row[f"{name} {variant}"] = compute_metrics(y, scores.argmax(axis=1), n_classes).uar
        per_fold.append(row)
        print(
            f"fold {fold.index}: C={choice.c}, T={temps[0]:.2f}/{temps[1]:.2f}: "
            + ", ".join(f"{v} {row['val ' + v]:.3f}/{row['test ' + v]:.3f}" for v in VARIANTS)
            + " (validation/test UAR)",
            flush=True,
        )
    summary = {}
    for split in ("val", "test"):
        for variant in VARIANTS:
            m, s = mean_std([row[f"{split} {variant}"] for row in per_fold])
            summary[f"{split} {variant}"] = {"mean": m, "std": s}
    return {"run_dir": str(run_dir), "folds": per_fold, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.run_dir)
    print("| combination | validation UAR (mean) | test UAR (mean ± std) |")
    print("|---|---:|---:|")
    for variant in VARIANTS:
        val, test = result["summary"][f"val {variant}"], result["summary"][f"test {variant}"]
        print(f"| {variant} | {val['mean']:.3f} | {test['mean']:.3f} ± {test['std']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
