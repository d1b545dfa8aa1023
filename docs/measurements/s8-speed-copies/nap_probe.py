"""Validation-only probe: does projecting out training speakers' directions (NAP) help the pooled LR?"""
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
spk = d["speaker"]
folds = make_folds(man, SplitConfig(n_folds=5, val_fraction=0.2, seed=0))
pos = {c: i for i, c in enumerate(ids)}
layers = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 2, 3, 4]
X = np.concatenate([d["mean"][:, layers].reshape(1200, -1), d["std"][:, layers].reshape(1200, -1)], 1)

def nap(xtr, str_, k):
    if k == 0:
        return np.eye(xtr.shape[1], dtype=np.float32)[:0]
    mus = np.stack([xtr[str_ == s].mean(0) for s in np.unique(str_)])
    mus = mus - mus.mean(0)
    u, s, vt = np.linalg.svd(mus, full_matrices=False)
    return vt[:k]

def run(tr, ev, k, c):
    sc = StandardScaler().fit(X[tr]); xtr = sc.transform(X[tr]); xev = sc.transform(X[ev])
    V = nap(xtr, spk[tr], k)
    if len(V):
        xtr = xtr - (xtr @ V.T) @ V; xev = xev - (xev @ V.T) @ V
    m = LogisticRegression(C=c, max_iter=2000).fit(xtr, y[tr])
    return compute_metrics(y[ev], m.predict(xev), 8).uar

for k in (0, 4, 8, 12):
    for c in (0.001, 0.01):
        vals = []
        for f in folds:
            tr, va = (np.array([pos[x] for x in s]) for s in (f.train_ids, f.val_ids))
            vals.append(run(tr, va, k, c))
        print(f"layers={layers} k={k:2d} C={c}: val UAR {np.mean(vals):.3f} per fold {np.round(vals,3)}", flush=True)
