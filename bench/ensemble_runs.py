"""Score the seed ensemble ``train.members = N`` would ship, from N finished standalone runs of its members.

Member k of ``train.members`` trains exactly what a standalone ``msata train`` run of the same recipe with
``train.seed = seed + k`` trains (modeling/training/members.py; tests/modeling/training/test_members.py checks it
on a small store). So, for each fold, this bench takes the ``best.pt`` of runs with seeds s, s+1, ..., s+N-1 (each
chosen on that fold's validation actors), writes them as one ensemble checkpoint with
``modeling.training.checkpoint.ensemble_payload`` (what ``train_members`` writes), loads it with
``load_trained_model`` and scores the fold's validation and test actors as ``msata train`` does. Prefixes are scored
too (members 0..k for every k), and each run's model alone, all reported; the figures a rule reads are named in the
run's design.md. Every run must be one recipe on one store and folds (only ``train.seed`` differs), without refit;
every fold of every run must have finished (its ``result.json``), and each model's validation and test figures here
are checked against the ones its run recorded.

With a pooled probe (``train.probe_weight``), a fold ships its ensemble with the probe fitted once and mixed in
(``fold_run.attach_pooled_probe`` on ``ensemble.pt``). The probe is fitted on the fold's clips in evaluation mode,
which do not depend on the seed, so every member run fitted the same one: this bench checks that the runs' probes
(in their ``probed.pt``) are equal, attaches member 0's to each ensemble checkpoint, and reports each figure as
shipped (with the probe) and of the model(s) alone.

Why a bench: three 30-epoch runs in one ``msata train --config ...members3.toml`` take three times as long on one
process as the members' standalone runs side by side on two cores, with the same result.

    .venv/bin/python bench/ensemble_runs.py RUN_SEED0 RUN_SEED1 [RUN_SEED2 ...] [--out OUT.json] [--folds K ...]
    .venv/bin/python bench/ensemble_runs.py --merge PART.json [PART.json ...] [--out OUT.json]  # parts scored with --folds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modeling.network.pooled_probe import CHECKPOINT_KEY as PROBE_KEY  # noqa: E402
from modeling.training.checkpoint import ensemble_payload, load_checkpoint, load_trained_model, save_checkpoint  # noqa: E402
from modeling.training.experiment_spec import load_spec  # noqa: E402
from modeling.training.fold_run import PROBED_FILE, loaders  # noqa: E402
from modeling.training.metrics import compute_metrics, mean_std  # noqa: E402
from modeling.training.train_loop import predict  # noqa: E402


def check_runs(run_dirs: list[Path]) -> None:
    """The runs are members 0..N-1 of one recipe: seeds s, s+1, ..., everything else equal."""
    first = load_spec(run_dirs[0])
    if first.train.refit or first.train.members != 1:
        raise SystemExit(f"{run_dirs[0]}: this bench combines runs of one model each, without refit")
    for k, run_dir in enumerate(run_dirs[1:], start=1):
        spec = load_spec(run_dir)
        wanted = replace(first.train, seed=first.train.seed + k)
        if spec.train != wanted:
            differ = {
                f: (getattr(spec.train, f), getattr(wanted, f)) for f in asdict(wanted) if getattr(spec.train, f) != getattr(wanted, f)
            }
            raise SystemExit(f"{run_dir}: its [train] is not {run_dirs[0]}'s with seed {wanted.seed} (its value, member {k}'s): {differ}")
        same = (spec.store_path, spec.folds, spec.model, spec.feature_config_hash, spec.copies_hash)
        if same != (first.store_path, first.folds, first.model, first.feature_config_hash, first.copies_hash):
            raise SystemExit(f"{run_dir}: another store, folds, model, features or copies than {run_dirs[0]}")
        if replace(spec.data, seed=0) != replace(first.data, seed=0):
            raise SystemExit(f"{run_dir}: another [data] than {run_dirs[0]}")


def scores(path: Path, loaders, n_classes: int) -> list:
    """The model at ``path``, loaded once, scored on each loader."""
    model, _, _ = load_trained_model(path, "cpu")
    metrics = []
    for loader in loaders:
        y, probs, _, _ = predict(model, loader, torch.device("cpu"))
        metrics.append(compute_metrics(y, probs.argmax(axis=1), n_classes))
    return metrics


def fold_probe(run_dirs: list[Path], fold_index: int) -> dict | None:
    """Member 0's fitted pooled probe for the fold (None without ``train.probe_weight``), after checking that every
    member run fitted the same one."""
    if not load_spec(run_dirs[0]).train.probe_weight:
        return None
    probes = [load_checkpoint(d / f"fold_{fold_index}" / PROBED_FILE)[PROBE_KEY] for d in run_dirs]
    for run_dir, probe in zip(run_dirs[1:], probes[1:], strict=True):
        same = probe.keys() == probes[0].keys() and all(
            torch.equal(v, probes[0][k]) if isinstance(v, torch.Tensor) else v == probes[0][k] for k, v in probe.items()
        )
        if not same:
            raise SystemExit(f"{run_dir}: fold {fold_index}'s pooled probe differs from {run_dirs[0]}'s; the members' probe is not one")
    return probes[0]


def score_entry(path: Path, probe: dict | None, loaders, n_classes: int, tmp: Path) -> dict:
    """Validation UAR and test figures of the checkpoint at ``path`` as shipped (with ``probe`` attached when given)
    and, with a probe, of the model(s) alone under ``"alone"``."""
    val, test = scores(path, loaders, n_classes)
    entry = {"val_uar": val.uar, "test": test.scalars()}
    if probe is None:
        return entry
    payload = load_checkpoint(path)
    payload[PROBE_KEY] = probe
    val_mixed, test_mixed = scores(save_checkpoint(tmp / f"probed-{path.name}", payload), loaders, n_classes)
    return {"val_uar": val_mixed.uar, "test": test_mixed.scalars(), "alone": entry}


def run(run_dirs: list[Path], only_folds: list[int] | None = None) -> dict:
    """Score every fold (or the folds ``only_folds`` names: a partial summary, for a look while runs go on)."""
    check_runs(run_dirs)
    spec = load_spec(run_dirs[0])
    n_classes = len(spec.label_names)
    folds = [f for f in spec.folds if only_folds is None or f.index in only_folds]
    if only_folds is not None and sorted(f.index for f in folds) != sorted(set(only_folds)):
        raise SystemExit(f"--folds {only_folds}: the runs have folds {[f.index for f in spec.folds]}")
    per_fold = []
    with tempfile.TemporaryDirectory(prefix="msata-ensemble-") as tmp:
        for fold in folds:
            started = time.time()
            _, val_loader, test_loader, _ = loaders(spec, fold, spec.train)
            bests = [d / f"fold_{fold.index}" / "best.pt" for d in run_dirs]
            row: dict = {"fold": fold.index, "members": {}, "ensembles": {}}
            for run_dir in run_dirs:
                if not (run_dir / f"fold_{fold.index}" / "result.json").is_file():  # a fold still training has a best.pt too
                    raise SystemExit(f"{run_dir}: fold {fold.index} has not finished (result.json missing); wait for it or resume it")
            probe = fold_probe(run_dirs, fold.index)
            for k, (run_dir, best) in enumerate(zip(run_dirs, bests, strict=True)):
                entry = score_entry(best, probe, (val_loader, test_loader), n_classes, Path(tmp))
                row["members"][k] = entry
                own = json.loads((run_dir / f"fold_{fold.index}" / "result.json").read_text())  # this scores what the run chose
                checks = [("validation UAR", entry.get("alone", entry)["val_uar"], own["best_val_uar"])]
                checks.append(("test UAR as shipped", entry["test"]["uar"], own["test"]["uar"]))
                if probe is not None:
                    checks.append(("validation UAR with the probe", entry["val_uar"], own["probe"]["val_uar_mixed"]))
                for what, here, there in checks:
                    if abs(here - there) > 1e-9:
                        raise SystemExit(f"{run_dir}: fold {fold.index}'s model has {what} {here} here, {there} in its run")
            for n in range(2, len(bests) + 1):
                path = save_checkpoint(Path(tmp) / f"fold{fold.index}-m{n}.pt", ensemble_payload([load_checkpoint(b) for b in bests[:n]]))
                row["ensembles"][n] = score_entry(path, probe, (val_loader, test_loader), n_classes, Path(tmp))
            row["seconds"] = round(time.time() - started, 1)
            per_fold.append(row)
            shown = ", ".join(f"{n} members {e['val_uar']:.3f}/{e['test']['uar']:.3f}" for n, e in row["ensembles"].items())
            alone = ", ".join(f"model {k} {m['val_uar']:.3f}/{m['test']['uar']:.3f}" for k, m in row["members"].items())
            shipped = " as shipped, with the probe" if probe is not None else ""
            print(f"fold {fold.index}: {shown}; {alone} (validation/test UAR{shipped}; {row['seconds']} s)", flush=True)
    scored = {"run_dirs": [str(d) for d in run_dirs], "probe": probe is not None, "folds": per_fold, "summary": summarise(per_fold)}
    return scored | ({"only_folds": [f.index for f in folds]} if only_folds is not None else {})


def merge(parts: list[dict]) -> dict:
    """One result from partial ones (``run(..., only_folds)``) of the same runs over distinct folds: what ``run`` over
    those folds returns, so folds can be scored as their runs finish them."""
    dirs = {(tuple(p["run_dirs"]), p["probe"]) for p in parts}
    if len(dirs) != 1:
        raise SystemExit(f"--merge: the parts score different runs: {sorted(dirs)}")
    rows = [row | {g: {int(k): v for k, v in row[g].items()} for g in ("members", "ensembles")} for p in parts for row in p["folds"]]
    per_fold = sorted(rows, key=lambda r: r["fold"])  # keys back to ints: JSON wrote them as strings
    indices = [r["fold"] for r in per_fold]
    if len(set(indices)) != len(indices):
        raise SystemExit(f"--merge: a fold is scored twice among the parts: {indices}")
    return {"run_dirs": parts[0]["run_dirs"], "probe": parts[0]["probe"], "folds": per_fold, "summary": summarise(per_fold)}


def summarise(per_fold: list[dict]) -> dict:
    """Mean validation UAR and test mean ± std per model and ensemble: as shipped, and with a probe also alone."""
    probed = "alone" in per_fold[0]["members"][0]
    views = []  # (label, group, key, view: None for the entry as shipped, "alone" for its model(s) without the probe)
    for group in ("members", "ensembles"):
        for key in per_fold[0][group]:
            name = f"model {key}" if group == "members" else f"{key} members"
            if probed:
                views += [(f"{name}, as shipped (with the probe)", group, key, None)]
                views += [(f"model {key} alone" if group == "members" else f"{name}, without the probe", group, key, "alone")]
            else:
                views += [(f"model {key} alone" if group == "members" else name, group, key, None)]
    summary = {}
    for label, group, key, view in views:
        entries = [r[group][key] if view is None else r[group][key][view] for r in per_fold]
        summary[label] = {"val_uar": sum(e["val_uar"] for e in entries) / len(entries)}
        for metric in ("wa", "uar", "macro_f1"):
            m, s = mean_std([e["test"][metric] for e in entries])
            summary[label][f"test_{metric}"] = {"mean": m, "std": s}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="*", help="run directories with seeds s, s+1, ... in that order")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--folds", type=int, nargs="+", help="score only these folds (a partial summary, never a result)")
    parser.add_argument("--merge", type=Path, nargs="+", help="the --out files of --folds runs over distinct folds: their summary")
    args = parser.parse_args()
    if args.merge and (args.runs or args.folds):
        parser.error("--merge sums up parts already scored: give it no run directories and no --folds")
    if args.merge:
        result = merge([json.loads(p.read_text()) for p in args.merge])
        print(f"folds {[r['fold'] for r in result['folds']]} of {len(args.merge)} partial scorings")
    elif len(args.runs) < 2:
        parser.error("give at least two run directories")
    else:
        result = run(args.runs, args.folds)
        if args.folds is not None:
            print(f"(folds {result['only_folds']} only: a partial summary)")
    print("| model | validation UAR (mean) | test WA | test UAR | test macro-F1 |")
    print("|---|---:|---:|---:|---:|")
    for label, e in result["summary"].items():
        t = {m: f"{e[f'test_{m}']['mean']:.3f} ± {e[f'test_{m}']['std']:.3f}" for m in ("wa", "uar", "macro_f1")}
        print(f"| {label} | {e['val_uar']:.4f} | {t['wa']} | {t['uar']} | {t['macro_f1']} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
