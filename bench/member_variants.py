"""More members at prediction time, scored on validation (and test, reported): the clip's own speed copies
(test-time augmentation, TTA) and a second seed's model, each mixed with the pooled probe.

For each fold, the ``best.pt`` of two finished ``msata train`` runs of one recipe that differ only in
``train.seed`` (the models as chosen on validation, without their probe) and the pooled probe, refitted as
training fits it (``modeling.training.probe_fit.choose_probe``: C on validation; it does not depend on the
seed), score every validation and test clip and its speed copies (the store holds copies of every clip:
``msata preprocess --speed-perturb``). Combinations, all geometric mixtures at the probe's weight 0.5
(``train.probe_mix = "geometric"``):

- ``K``: the first run's model and the probe, on the clip alone (what that run ships, if it ships the probe; a
  run without one is checked against its model alone, ``model 0``);
- ``T``: as K, each member's log-probabilities first averaged over the clip and its copies;
- ``E``: as K, the model's log-probabilities the mean of the two runs' models';
- ``ET``: both; ``T seed 1``: T with the second run's model;
- and, for the record, each model and the probe alone, with and without TTA.

Nothing compares the two runs' train configs: a second run of another recipe (session 13: the mixup variant)
works, and its rows (``E``, ``T seed 1``, ``model 1``) then mean that recipe's model, not a second seed's.

The rules that read these figures are in docs/measurements/s12-members/design.md and
docs/measurements/s13-scratch-copies/design.md; nothing here is chosen on test.

    .venv/bin/python bench/member_variants.py SEED0_RUN_DIR SEED1_RUN_DIR [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.special
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.data import splits as sp  # noqa: E402
from modeling.network.pooled_probe import pooled_statistics  # noqa: E402
from modeling.network.precision import autocast  # noqa: E402
from modeling.training.checkpoint import load_trained_model  # noqa: E402
from modeling.training.experiment_spec import load_spec  # noqa: E402
from modeling.training.fold_run import loaders  # noqa: E402
from modeling.training.metrics import compute_metrics, mean_std  # noqa: E402
from modeling.training.probe_fit import choose_probe, pooled_features  # noqa: E402
from storage.feature_store import FeatureStore  # noqa: E402

PROBE_WEIGHT = 0.5
CANDIDATES = ("K", "T", "E", "ET")
RECORD = ("T seed 1", "model 0", "model 0 TTA", "model 1", "model 1 TTA", "models 0+1", "probe", "probe TTA")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return scipy.special.log_softmax(logits, axis=-1)


@torch.no_grad()
def score_clips(models, probe, loader) -> tuple[list[str], np.ndarray, list[np.ndarray], np.ndarray]:
    """(clip ids, labels (N,), per model log-probabilities (N, C), probe log-probabilities (N, C)) in one pass."""
    ids, labels, per_model, probe_scores = [], [], [[] for _ in models], []
    for batch in loader:
        if not bool(batch.audio_mask.any(dim=1).all()):
            raise SystemExit(f"a clip without audio among {batch.clip_ids}: this bench scores audio-only runs")
        ids.extend(batch.clip_ids)
        labels.extend(batch.labels.numpy())
        with autocast(torch.device("cpu")):
            for k, model in enumerate(models):
                per_model[k].append(log_softmax(model(batch).logits.float().numpy()))
        probe_scores.append(log_softmax(probe.logits_of(pooled_statistics(batch.audio, batch.audio_mask)).numpy()))
    return ids, np.asarray(labels), [np.concatenate(p) for p in per_model], np.concatenate(probe_scores)


def tta_average(ids: list[str], scores: np.ndarray, sources: tuple[str, ...], source_of: dict[str, str]) -> np.ndarray:
    """(len(sources), C): the mean of each source clip's scores and its copies' scores."""
    row = {s: i for i, s in enumerate(sources)}
    total, count = np.zeros((len(sources), scores.shape[1])), np.zeros(len(sources))
    for cid, s in zip(ids, scores, strict=True):
        i = row[source_of.get(cid, cid)]
        total[i] += s
        count[i] += 1
    return total / count[:, None]


def combinations(plain: dict[str, np.ndarray], tta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    w = PROBE_WEIGHT

    def mix(model_scores: np.ndarray, probe_scores: np.ndarray) -> np.ndarray:
        return (1 - w) * model_scores + w * probe_scores

    both, both_tta = (plain["m0"] + plain["m1"]) / 2, (tta["m0"] + tta["m1"]) / 2
    return {
        "K": mix(plain["m0"], plain["probe"]),
        "T": mix(tta["m0"], tta["probe"]),
        "E": mix(both, plain["probe"]),
        "ET": mix(both_tta, tta["probe"]),
        "T seed 1": mix(tta["m1"], tta["probe"]),
        "model 0": plain["m0"],
        "model 0 TTA": tta["m0"],
        "model 1": plain["m1"],
        "model 1 TTA": tta["m1"],
        "models 0+1": both,
        "probe": plain["probe"],
        "probe TTA": tta["probe"],
    }


def run(run_dirs: tuple[Path, Path]) -> dict:
    spec = load_spec(run_dirs[0])
    other = load_spec(run_dirs[1])
    for run_dir, one in zip(run_dirs, (spec, other), strict=True):
        if one.train.members > 1:  # its best.pt is member 0 only, not what the run ships
            raise SystemExit(f"{run_dir}: a train.members = {one.train.members} run; this bench rescores runs of one model each")
    if (other.store_path, other.folds, other.model, replace(other.data, seed=0)) != (
        spec.store_path,
        spec.folds,
        spec.model,
        replace(spec.data, seed=0),
    ):
        raise SystemExit(f"{run_dirs[1]}: another store, folds, model or data config than {run_dirs[0]}")
    shipped = (spec.train.probe_weight, spec.train.probe_mix, spec.train.refit)
    # The first run's own validation figure is the check that this bench scores what the run ships: K for a
    # run with the geometric probe, "model 0" for a run without a probe (the probe combinations are then new).
    with_probe = shipped == (PROBE_WEIGHT, "geometric", False)
    if not (with_probe or shipped[0] == 0.0 and not shipped[2]) or not spec.data.speed_copies:
        raise SystemExit(
            f"{run_dirs[0]}: this bench rescores runs with speed copies, no refit, and either probe_weight {PROBE_WEIGHT} with "
            f"probe_mix 'geometric' (K is what they ship) or no probe (model 0 is); this one has {shipped}, "
            f"speed_copies={spec.data.speed_copies}"
        )
    shipped_name = "K" if with_probe else "model 0"
    n_classes = len(spec.label_names)
    _, copies = sp.split_speed_copies(FeatureStore.open(spec.store_path).manifest())
    source_of = {c: src for src, cs in copies.items() for c in cs}
    per_fold = []
    for fold in spec.folds:
        started = time.time()
        _, val_loader, _, make_loader = loaders(spec, fold, spec.train)
        models = [load_trained_model(d / f"fold_{fold.index}" / "best.pt", "cpu")[0] for d in run_dirs]
        train_clips = pooled_features(make_loader(fold.train_ids, False, 0, with_copies=True, cache=False))
        choice = choose_probe(train_clips, pooled_features(val_loader), n_classes, PROBE_WEIGHT, spec.train.seed, mix="geometric")
        row = {"fold": fold.index, "C": choice.c}
        for split, sources in (("val", fold.val_ids), ("test", fold.test_ids)):
            with_copies = make_loader(sources, False, 0, with_copies=True, cache=False)
            ids, labels, model_scores, probe_scores = score_clips(models, choice.probe, with_copies)
            n = len(sources)
            if tuple(ids[:n]) != tuple(sources) or len(ids) == n:
                raise SystemExit(f"fold {fold.index} {split}: the loader did not give the source clips first, in order, then copies")
            named = {"m0": model_scores[0], "m1": model_scores[1], "probe": probe_scores}
            plain = {k: v[:n] for k, v in named.items()}
            tta = {k: tta_average(ids, v, tuple(sources), source_of) for k, v in named.items()}
            row[f"{split} copies per clip"] = (len(ids) - n) / n
            for name, scores in combinations(plain, tta).items():
                row[f"{split} {name}"] = compute_metrics(labels[:n], scores.argmax(axis=1), n_classes).uar
        result = json.loads((run_dirs[0] / f"fold_{fold.index}" / "result.json").read_text())
        shipped_val = result["probe"]["val_uar_mixed"] if with_probe else result["best_val_uar"]
        if abs(row[f"val {shipped_name}"] - shipped_val) > 1e-9:
            raise SystemExit(
                f"fold {fold.index}: {shipped_name}'s validation UAR {row[f'val {shipped_name}']} is not the run's own {shipped_val}"
            )
        row["seconds"] = round(time.time() - started, 1)
        per_fold.append(row)
        print(
            f"fold {fold.index}: C={choice.c}, "
            + ", ".join(f"{v} {row['val ' + v]:.3f}/{row['test ' + v]:.3f}" for v in CANDIDATES + RECORD)
            + f" (validation/test UAR; {row['seconds']} s)",
            flush=True,
        )
    summary = {}
    for split in ("val", "test"):
        for name in CANDIDATES + RECORD:
            m, s = mean_std([row[f"{split} {name}"] for row in per_fold])
            summary[f"{split} {name}"] = {"mean": m, "std": s}
    return {"run_dirs": [str(d) for d in run_dirs], "folds": per_fold, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed0_run", type=Path)
    parser.add_argument("seed1_run", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run((args.seed0_run, args.seed1_run))
    print("| combination | validation UAR (mean) | test UAR (mean ± std) |")
    print("|---|---:|---:|")
    for name in CANDIDATES + RECORD:
        val, test = result["summary"][f"val {name}"], result["summary"][f"test {name}"]
        print(f"| {name} | {val['mean']:.4f} | {test['mean']:.3f} ± {test['std']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
