"""Throwaway probe: Whisper-base states of speed-perturbed clips (resampled, as Kaldi/lhotse speed
perturbation: tempo and pitch change together), pooled mean/std over time, for the LR probe."""
import sys, time, glob, os, numpy as np, torch
from fractions import Fraction
from scipy.signal import resample_poly
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
import soundfile as sf
from features.audio_encoders.stage import load_packaged_encoder
from features.audio_encoders.whisper import whisper_log_mel
factor, out = float(sys.argv[1]), sys.argv[2]
model = load_packaged_encoder("whisper-base", "cpu")
d = np.load("/work/tune/wb_pooled.npz")
ids = d["ids"].tolist()
root = "/work/shared/data/ravdess_speech_16k"
files = {os.path.basename(p).rsplit(".", 1)[0][3:]: p for p in glob.glob(root + "/Actor_*/*")}
fr = Fraction(factor).limit_denominator(100)  # speed f: play f times faster -> N / f samples
means, stds = [], []
t0 = time.time()
for i, cid in enumerate(ids):
    wave, sr = sf.read(files[cid], dtype="float32")
    w = resample_poly(wave, fr.denominator, fr.numerator).astype(np.float32) if factor != 1 else wave
    with torch.inference_mode():
        st = model(whisper_log_mel(torch.from_numpy(w))[None])
    s = torch.stack([x[0] for x in st], 1).to(torch.float16).float().numpy()
    means.append(s.mean(0)); stds.append(s.std(0))
    if i % 200 == 0:
        print(factor, i, f"{(time.time()-t0)/(i+1):.2f} s/clip", flush=True)
np.savez(out, ids=np.array(ids), mean=np.stack(means), std=np.stack(stds))
print("done", time.time() - t0)
