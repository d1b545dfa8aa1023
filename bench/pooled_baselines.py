"""Floors for the emotion results: logistic regression on pooled features, same folds as training.

For every clip of a feature store, the frames are pooled into mean and standard deviation
(log-mel stores: per mel channel plus MFCCs from the log-mel; encoder stores: per stored
layer, and all layers side by side), a standardised logistic regression is fitted on each
fold's training speakers, its C (and, for encoder stores, the view) is chosen on the fold's
validation speakers only, and the choice is scored once on the test speakers. ``--refit``
fits the chosen view and C again on training + validation speakers before that one test
(the floor of ``train.refit``). The folds are msata's own
(``modeling.data.splits.make_folds``), so these figures sit beside ``msata train``'s.

``--speaker-norm`` adds the transductive variant: each speaker's pooled vectors are
standardised with that speaker's own mean and std (unlabelled clips of the test speaker
included). It is reported apart, labelled transductive.

    .venv/bin/python bench/pooled_baselines.py --store STORE --dataset ravdess --folds 5 --val-fraction 0.2 --out OUT.json

``--speed-copies`` fits on the store's speed-perturbed copies of the training (and, refitted,
validation) speakers' clips as well, as ``[data] speed_copies = true`` trains msata (the floor
of that recipe); copies are never validated or tested on, and without the flag they are ignored.

``--store bench-features:WORK/ENCODER --audio RAVDESS_ROOT`` reads the memory-mapped features
``bench/gpu_ravdess.py`` saved in its --work folder instead of a Zarr store (same clips, same folds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.data.splits import SplitConfig, ids_with_copies, make_folds, resolve_label_names, split_speed_copies  # noqa: E402
from modeling.training.metrics import compute_metrics, mean_std  # noqa: E402
from storage import FeatureStore  # noqa: E402

C_GRID = (0.01, 0.1, 1.0, 10.0)


def pooled_views(store: FeatureStore, clip_ids: list[str]) -> dict[str, np.ndarray]:
    """name -> (N, 2F) mean+std pooled vectors, one view per representation (or layer)."""
    views: dict[str, list[np.ndarray]] = {}
    for cid in clip_ids:
        clip = store.read(cid)
        if clip.audio_states is not None:
            states = clip.audio_states.astype(np.float32)  # (T, L, D)
            for i, layer in enumerate(store.config.audio_encoder.state_indices()):
                views.setdefault(f"layer {layer}", []).append(np.concatenate([states[:, i].mean(0), states[:, i].std(0)]))
            views.setdefault("all layers", []).append(np.concatenate([states.mean(0).ravel(), states.std(0).ravel()]))
        else:
            logmel = clip.logmel  # (T, F)
            mfcc = scipy.fft.dct(logmel, type=2, norm="ortho", axis=1)[:, :20]  # (T, 20)
            stats = [logmel.mean(0), logmel.std(0), mfcc.mean(0), mfcc.std(0)]
            views.setdefault("log-mel+MFCC stats", []).append(np.concatenate(stats))
    return {name: np.stack(rows) for name, rows in views.items()}


def speaker_standardise(x: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for spk in np.unique(speakers):
        rows = speakers == spk
        out[rows] = (x[rows] - x[rows].mean(0)) / (x[rows].std(0) + 1e-6)
    return out


def fit_score(x: np.ndarray, y: np.ndarray, train: np.ndarray, evaluate: np.ndarray, c: float, seed: int) -> np.ndarray:
    scaler = StandardScaler().fit(x[train])
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(scaler.transform(x[train]), y[train])
    return model.predict(scaler.transform(x[evaluate]))


class BenchFeatures:
    """What this script reads from a FeatureStore, over bench/gpu_ravdess.py's saved features."""

    def __init__(self, directory: Path, audio_root: str) -> None:
        import pandas as pd

        from bench.gpu_ravdess import LOG_MEL, MemoryStore, ravdess_clips
        from features.config import AudioEncoderConfig, FeatureConfig

        encoder = directory.name
        self.config = FeatureConfig() if encoder == LOG_MEL else FeatureConfig(audio_encoder=AudioEncoderConfig(name=encoder))
        self.config_hash = self.config.config_hash()
        self._memory = MemoryStore(directory, encoder == LOG_MEL)
        clips = [c for c in ravdess_clips(Path(audio_root)) if c.clip_id in self._memory.span]
        self._manifest = pd.DataFrame([{"clip_id": c.clip_id, "speaker": c.speaker, "label": c.label} for c in clips])

    def manifest(self):
        return self._manifest

    def read(self, clip_id: str):
        return self._memory.read(clip_id)


def run(
    store_path: str,
    dataset: str,
    split_config: SplitConfig,
    speaker_norm: bool,
    audio_root: str = "",
    refit: bool = False,
    speed_copies: bool = False,
) -> dict:
    if store_path.startswith("bench-features:"):
        store = BenchFeatures(Path(store_path.split(":", 1)[1]), audio_root)
    else:
        store = FeatureStore.open(store_path)
    if speed_copies and speaker_norm:
        raise SystemExit("--speed-copies with --speaker-norm: a speaker's statistics would mix recordings and copies; choose one")
    everything = store.manifest()
    manifest, copies = split_speed_copies(everything)  # folds of recordings; copies only ever join training
    if speed_copies and not copies:
        raise SystemExit(f"--speed-copies: {store_path} holds no speed-perturbed copies (msata preprocess --speed-perturb 0.9,1.1)")
    read = everything if speed_copies else manifest
    labels = resolve_label_names(dataset, manifest)
    clip_ids = read["clip_id"].astype(str).tolist()
    y = np.array([labels.index(v) for v in read["label"]])
    speakers = read["speaker"].astype(str).to_numpy()
    views = pooled_views(store, clip_ids)
    if speaker_norm:
        views = {name: speaker_standardise(x, speakers) for name, x in views.items()}
    position = {cid: i for i, cid in enumerate(clip_ids)}
    folds = make_folds(manifest, split_config)
    per_fold = []
    for fold in folds:
        train_ids = ids_with_copies(fold.train_ids, copies) if speed_copies else fold.train_ids
        tr, va, te = (np.array([position[c] for c in ids]) for ids in (train_ids, fold.val_ids, fold.test_ids))
        best = None
        for name, x in views.items():  # model choice: validation speakers only
            for c in C_GRID:
                val_uar = compute_metrics(y[va], fit_score(x, y, tr, va, c, split_config.seed), len(labels)).uar
                if best is None or val_uar > best[0]:
                    best = (val_uar, name, c)
        _, name, c = best
        val_copies = [position[c] for cid in fold.val_ids for c in copies.get(cid, ())] if speed_copies else []
        fit_on = np.concatenate([tr, va, np.array(val_copies, dtype=int)]) if refit else tr  # --refit: training + validation speakers
        test = compute_metrics(y[te], fit_score(views[name], y, fit_on, te, c, split_config.seed), len(labels))
        per_fold.append(
            {"fold": fold.index, "view": name, "C": c, "val_uar": best[0], **test.scalars(), "test_speakers": list(fold.test_speakers)}
        )
        print(
            f"fold {fold.index}: {name}, C={c}: val UAR {best[0]:.3f}, test WA {test.wa:.3f} UAR {test.uar:.3f} F1 {test.macro_f1:.3f}",
            flush=True,
        )
    summary = {}
    for key in ("wa", "uar", "macro_f1"):
        m, s = mean_std([f[key] for f in per_fold])
        summary[f"{key}_mean"], summary[f"{key}_std"] = m, s
    return {
        "store": store_path,
        "feature_config_hash": store.config_hash,
        "speaker_norm": speaker_norm,
        "refit": refit,
        "speed_copies": speed_copies,
        "folds": per_fold,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speaker-norm", action="store_true", help="transductive: standardise per speaker")
    parser.add_argument("--refit", action="store_true", help="refit the validation choice on training + validation speakers")
    parser.add_argument("--speed-copies", action="store_true", help="fit on the store's speed-perturbed copies of training clips too")
    parser.add_argument("--out", help="write the result as JSON")
    parser.add_argument("--audio", default="", help="RAVDESS root, with --store bench-features:DIR")
    args = parser.parse_args()
    started = time.time()
    result = run(
        args.store,
        args.dataset,
        SplitConfig(n_folds=args.folds, val_fraction=args.val_fraction, seed=args.seed),
        args.speaker_norm,
        args.audio,
        args.refit,
        args.speed_copies,
    )
    result["wall_s"] = round(time.time() - started, 1)
    s = result["summary"]
    tag = " (transductive: per-speaker standardisation)" if args.speaker_norm else ""
    tag += " (refit on training + validation speakers)" if args.refit else ""
    tag += " (with speed-perturbed copies of the training clips)" if args.speed_copies else ""
    print(
        f"{args.store}{tag}: WA {s['wa_mean']:.3f} ± {s['wa_std']:.3f}, UAR {s['uar_mean']:.3f} ± {s['uar_std']:.3f}, macro-F1 {s['macro_f1_mean']:.3f} ± {s['macro_f1_std']:.3f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
