"""Validation-only probe: pooled LR trained with speed-perturbed copies of the training clips."""
import sys, numpy as np, pandas as pd, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, "/work/main")
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from modeling.data.splits import SplitConfig, make_folds, resolve_label_names
from modeling.training.metrics import compute_metrics
d = np.load("/work/tune/wb_pooled.npz")
ids = d["ids"].tolist()
man = pd.DataFrame({"clip_id": ids, "speaker": d["speaker"], "label": d["label"]})
labels = resolve_label_names("ravdess", man)
y = np.array([labels.index(v) for v in man["label"]])
folds = make_folds(man, SplitConfig(n_folds=5, val_fraction=0.2, seed=0))
pos = {c: i for i, c in enumerate(ids)}
factors = sys.argv[2].split(",") if len(sys.argv) > 2 else ["0.9", "1.1"]
aug = {f: np.load(f"/work/tune/s8/sp{f}.npz") for f in factors}
for f, a in aug.items():
    assert a["ids"].tolist() == ids
def feats(src, layers):
    return np.concatenate([src["mean"][:, layers].reshape(1200, -1), src["std"][:, layers].reshape(1200, -1)], 1)
mode = sys.argv[1]
for layers in ([1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]):
    X = feats(d, layers); XA = [feats(a, layers) for a in aug.values()]
    for c in (0.001, 0.01):
        vals = []
        for f in folds:
            tr, va = (np.array([pos[x] for x in s]) for s in (f.train_ids, f.val_ids))
            xtr, ytr = X[tr], y[tr]
            if mode in ("aug", "aug+tta"):
                xtr = np.concatenate([xtr] + [x[tr] for x in XA]); ytr = np.concatenate([ytr] * (1 + len(XA)))
            sc = StandardScaler().fit(xtr)
            m = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(xtr), ytr)
            p = m.predict_proba(sc.transform(X[va]))
            if mode == "aug+tta":
                p = p + sum(m.predict_proba(sc.transform(x[va])) for x in XA)
            vals.append(compute_metrics(y[va], p.argmax(1), 8).uar)
        print(f"{mode} layers={layers} C={c}: val UAR {np.mean(vals):.3f} {np.round(vals,3)}", flush=True)
