import sys, time, numpy as np
sys.path.insert(0, "/work/main")
from storage import FeatureStore
store = FeatureStore.open("/work/stores/ravdess-whisper-base")
m = store.manifest()
ids = m["clip_id"].astype(str).tolist()
t = time.time()
means, stds, q = [], [], []
for i, cid in enumerate(ids):
    s = store.read(cid).audio_states.astype(np.float32)  # (T, L, D)
    means.append(s.mean(0)); stds.append(s.std(0))
np.savez("/work/tune/wb_pooled.npz", ids=np.array(ids), mean=np.stack(means), std=np.stack(stds),
         speaker=m["speaker"].astype(str).to_numpy().astype("U"), label=m["label"].astype(str).to_numpy().astype("U"))
print("done", time.time() - t, np.stack(means).shape)
