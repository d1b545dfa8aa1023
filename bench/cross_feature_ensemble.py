"""Score a geometric mixture of two finished recipes that read different stores (e.g. Whisper states and log-mel).

Side A and side B are each one finished ``msata train`` run (its fold models as shipped: ``probed.pt`` when the
recipe has a pooled probe, else ``best.pt``) or several runs of one recipe with seeds s, s+1, ... (their ``best.pt``
as the ensemble ``train.members`` ships, via ``bench/ensemble_runs.py``'s checks and ``ensemble_payload``; a probe is
attached as there). Every run must use the same folds (``splits.json`` equal). For each fold both sides predict the
fold's validation and test actors from their own stores; the clips are matched by id (the sets must be equal), and
for each weight v the mixture

    log p = (1 - v) log p_A + v log p_B   (argmax of its softmax = the prediction)

is scored. Each model's validation and test figures alone are checked against the ones its run recorded, so this
scores what the runs chose. Nothing is chosen on test: compare the weights on mean validation UAR (which also chose
every model's epoch: an optimistic figure), test is printed beside for the record.

    .venv/bin/python bench/cross_feature_ensemble.py --a RUN [RUN ...] --b RUN [RUN ...] --weights 0.25 0.5 [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.special

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ensemble_runs import check_runs, fold_probe  # noqa: E402

from modeling.network.pooled_probe import CHECKPOINT_KEY as PROBE_KEY  # noqa: E402
from modeling.training.checkpoint import ensemble_payload, load_checkpoint, load_trained_model, save_checkpoint  # noqa: E402
from modeling.training.experiment_spec import load_spec  # noqa: E402
from modeling.training.fold_run import PROBED_FILE, loaders  # noqa: E402
from modeling.training.metrics import compute_metrics, mean_std  # noqa: E402
from modeling.training.train_loop import predict  # noqa: E402


def side_checkpoint(run_dirs: list[Path], fold: int, tmp: Path) -> Path:
    """The checkpoint this side ships for ``fold``: one run's as shipped, or its members' ensemble (+ probe)."""
    for run_dir in run_dirs:
        if not (run_dir / f"fold_{fold}" / "result.json").is_file():
            raise SystemExit(f"{run_dir}: fold {fold} has not finished (result.json missing)")
    if len(run_dirs) == 1:
        probed = run_dirs[0] / f"fold_{fold}" / PROBED_FILE
        return probed if probed.is_file() else run_dirs[0] / f"fold_{fold}" / "best.pt"
    payload = ensemble_payload([load_checkpoint(d / f"fold_{fold}" / "best.pt") for d in run_dirs])
    probe = fold_probe(run_dirs, fold)
    if probe is not None:
        payload[PROBE_KEY] = probe
    return save_checkpoint(tmp / f"{run_dirs[0].name}-fold{fold}-m{len(run_dirs)}.pt", payload)


def predictions(path: Path, loader) -> tuple[np.ndarray, np.ndarray, list[str]]:
    model, _, _ = load_trained_model(path, "cpu")
    y, probs, ids, _ = predict(model, loader, torch.device("cpu"))
    return y, probs, ids


def checked_predictions(run_dir: Path, fold: int, val_loader, test_loader, n_classes: int) -> dict:
    """One run's fold model as shipped on the validation and test actors, after checking that it scores here what its
    run recorded (validation as shipped, test)."""
    own = json.loads((run_dir / f"fold_{fold}" / "result.json").read_text())
    path = side_checkpoint([run_dir], fold, Path())  # one run: its own file, nothing written
    recorded = {"val": (own.get("probe") or {}).get("val_uar_mixed", own["best_val_uar"]), "test": own["test"]["uar"]}
    out = {}
    for split, loader in (("val", val_loader), ("test", test_loader)):
        out[split] = predictions(path, loader)
        y, probs, _ = out[split]
        here = compute_metrics(y, probs.argmax(axis=1), n_classes).uar
        if abs(here - recorded[split]) > 1e-9:
            raise SystemExit(f"{run_dir}: fold {fold}'s model has {split} UAR {here} here, {recorded[split]} in its run")
    return out


def side_scores(run_dirs: list[Path], fold_index: int, tmp: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    spec = load_spec(run_dirs[0])
    fold = next(f for f in spec.folds if f.index == fold_index)
    _, val_loader, test_loader, _ = loaders(spec, fold, spec.train)
    alone = [checked_predictions(d, fold_index, val_loader, test_loader, len(spec.label_names)) for d in run_dirs]
    if len(run_dirs) == 1:  # the side is that model: its predictions are already made
        return alone[0]
    path = side_checkpoint(run_dirs, fold_index, tmp)
    return {"val": predictions(path, val_loader), "test": predictions(path, test_loader)}


def aligned(a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, log p_A, log p_B) over the same clips in A's order."""
    ya, pa, ids_a = a
    yb, pb, ids_b = b
    if sorted(ids_a) != sorted(ids_b):
        raise SystemExit(f"the two sides predicted different clips ({len(set(ids_a) ^ set(ids_b))} differ)")
    order = {cid: i for i, cid in enumerate(ids_b)}
    rows = np.asarray([order[cid] for cid in ids_a])
    if not np.array_equal(ya, yb[rows]):
        raise SystemExit("the two sides label the same clips differently")
    return ya, np.log(np.clip(pa, 1e-12, None)), np.log(np.clip(pb[rows], 1e-12, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, nargs="+", required=True, help="side A: one run, or runs with seeds s, s+1, ...")
    parser.add_argument("--b", type=Path, nargs="+", required=True, help="side B: one run, or runs with seeds s, s+1, ...")
    parser.add_argument("--weights", type=float, nargs="+", required=True, help="weights v of side B in the mixture")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for side in (args.a, args.b):
        if len(side) > 1:
            check_runs(side)
    splits = {(d / "splits.json").read_text() for d in args.a + args.b}
    if len(splits) != 1:
        raise SystemExit("the runs do not share one splits.json: their folds differ")
    if any(not 0.0 <= v <= 1.0 for v in args.weights):
        raise SystemExit(f"--weights {args.weights}: each must be in [0, 1]")
    spec = load_spec(args.a[0])
    if load_spec(args.b[0]).label_names != spec.label_names:
        raise SystemExit("the two sides have different label names")
    n_classes = len(spec.label_names)
    weights = sorted({0.0, 1.0, *args.weights})
    per_fold = []
    with tempfile.TemporaryDirectory(prefix="msata-xfeat-") as tmp:
        for fold in spec.folds:
            started = time.time()
            a, b = side_scores(args.a, fold.index, Path(tmp)), side_scores(args.b, fold.index, Path(tmp))
            row: dict = {"fold": fold.index, "weights": {}}
            for v in weights:
                entry = {}
                for part in ("val", "test"):
                    y, log_a, log_b = aligned(a[part], b[part])
                    pred = scipy.special.log_softmax((1.0 - v) * log_a + v * log_b, axis=1).argmax(axis=1)
                    entry[part] = compute_metrics(y, pred, n_classes).scalars()
                row["weights"][str(v)] = entry
            row["seconds"] = round(time.time() - started, 1)
            per_fold.append(row)
            shown = ", ".join(f"v={v}: {e['val']['uar']:.3f}/{e['test']['uar']:.3f}" for v, e in row["weights"].items())
            print(f"fold {fold.index}: {shown} (validation/test UAR; {row['seconds']} s)", flush=True)
    summary = {}
    for v in row["weights"]:
        entries = [r["weights"][v] for r in per_fold]
        summary[v] = {"val_uar": sum(e["val"]["uar"] for e in entries) / len(entries)}
        for metric in ("wa", "uar", "macro_f1"):
            m, s = mean_std([e["test"][metric] for e in entries])
            summary[v][f"test_{metric}"] = {"mean": m, "std": s}
    print("| weight v of side B | validation UAR (mean) | test WA | test UAR | test macro-F1 |")
    print("|---|---:|---:|---:|---:|")
    for v, e in summary.items():
        t = {m: f"{e[f'test_{m}']['mean']:.3f} ± {e[f'test_{m}']['std']:.3f}" for m in ("wa", "uar", "macro_f1")}
        print(f"| {v} | {e['val_uar']:.4f} | {t['wa']} | {t['uar']} | {t['macro_f1']} |")
    if args.out:
        result = {"a": [str(d) for d in args.a], "b": [str(d) for d in args.b], "folds": per_fold, "summary": summary}
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
