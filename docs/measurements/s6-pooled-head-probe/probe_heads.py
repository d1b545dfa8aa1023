"""Session 6 throwaway probe: heads on pooled Whisper-base statistics. VALIDATION UAR ONLY (test actors never scored)."""
import sys, numpy as np, pandas as pd, torch, itertools, json
sys.path.insert(0, "/work/main")
from modeling.data.splits import SplitConfig, make_folds, resolve_label_names
from modeling.training.metrics import compute_metrics
torch.set_num_threads(1)
d = np.load("/work/tune/wb_pooled.npz")
ids = d["ids"].tolist()
man = pd.DataFrame({"clip_id": ids, "speaker": d["speaker"], "label": d["label"]})
labels = resolve_label_names("ravdess", man)
y = np.array([labels.index(v) for v in man["label"]])
folds = make_folds(man, SplitConfig(n_folds=5, val_fraction=0.2, seed=0))
pos = {c: i for i, c in enumerate(ids)}
X = np.concatenate([d["mean"], d["std"]], axis=-1)  # (N, 7, 1024)
print([sorted(set(man.speaker[[pos[c] for c in f.val_ids]])) for f in folds])

class Head(torch.nn.Module):
    def __init__(s, kind, hidden, p):
        super().__init__(); s.kind = kind
        s.w = torch.nn.Parameter(torch.zeros(7))
        din = 7 * 1024 if kind == "concat" else 1024
        s.drop = torch.nn.Dropout(p)
        s.net = torch.nn.Linear(din, 8) if hidden == 0 else torch.nn.Sequential(torch.nn.Linear(din, hidden), torch.nn.GELU(), torch.nn.Dropout(p), torch.nn.Linear(hidden, 8))
    def forward(s, x):  # (B, 7, 1024)
        x = x.flatten(1) if s.kind == "concat" else torch.einsum("l,bld->bd", torch.softmax(s.w, 0), x)
        return s.net(s.drop(x))

def run(kind, hidden, p, lr, wd, epochs, seed, tr, va, mixup=0.0):
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-5
    xt = torch.tensor((X[tr] - mu) / sd, dtype=torch.float32); yt = torch.tensor(y[tr])
    xv = torch.tensor((X[va] - mu) / sd, dtype=torch.float32)
    torch.manual_seed(seed); m = Head(kind, hidden, p)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed); curve = []; probs = []
    for ep in range(epochs):
        m.train()
        for idx in torch.randperm(len(tr), generator=g).split(32):
            xb, yb = xt[idx], torch.nn.functional.one_hot(yt[idx], 8).float()
            if mixup:
                lam = float(np.random.default_rng(seed * 1000 + ep).beta(mixup, mixup)); perm = torch.randperm(len(idx), generator=g)
                xb = lam * xb + (1 - lam) * xb[perm]; yb = lam * yb + (1 - lam) * yb[perm]
            loss = torch.nn.functional.cross_entropy(m(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step()
        m.eval()
        with torch.no_grad(): pv = torch.softmax(m(xv), -1).numpy()
        probs.append(pv); curve.append(compute_metrics(y[va], pv.argmax(1), 8).uar)
    return np.array(curve), probs

cands = {
  "concat-lin-p0.5": dict(kind="concat", hidden=0, p=0.5, lr=1e-3, wd=1e-2, epochs=40),
  "concat-lin-p0.2-wd0.1": dict(kind="concat", hidden=0, p=0.2, lr=3e-4, wd=0.1, epochs=40),
  "mix-lin-p0.3": dict(kind="mix", hidden=0, p=0.3, lr=1e-3, wd=1e-2, epochs=40),
  "mix-mlp256-p0.3": dict(kind="mix", hidden=256, p=0.3, lr=1e-3, wd=1e-2, epochs=40),
  "mix-mlp256-p0.5-mixup": dict(kind="mix", hidden=256, p=0.5, lr=1e-3, wd=1e-2, epochs=40, mixup=0.4),
  "concat-mlp256-p0.5": dict(kind="concat", hidden=256, p=0.5, lr=1e-3, wd=1e-2, epochs=40),
}
only = sys.argv[1:] or list(cands)
for name in only:
    c = cands[name]; best, ens, curves = [], [], []
    for f in folds:
        tr, va = (np.array([pos[i] for i in s]) for s in (f.train_ids, f.val_ids))
        runs = [run(seed=s, tr=tr, va=va, **c) for s in range(3)]
        cv = np.mean([r[0] for r in runs], 0); curves.append(cv)
        ensc = [compute_metrics(y[va], sum(r[1][e] for r in runs).argmax(1), 8).uar for e in range(c["epochs"])]
        best.append(cv.max()); ens.append(max(ensc))
    mc = np.mean(curves, 0)
    print(f"{name:28s} per-fold best val (seed mean) {np.mean(best):.3f} | 3-seed ens best {np.mean(ens):.3f} | fixed-epoch curve max {mc.max():.3f} @ {mc.argmax()+1} (ep10 {mc[9]:.3f} ep20 {mc[19]:.3f})", flush=True)
