"""Store the remaining speed copies with msata's own process_clip (what each Prefect clip task runs),
in plain processes: the Prefect bookkeeping cost ~1 s per clip on this 2-core machine."""
import sys, time
sys.path.insert(0, "/work/main")
from features.recipes import discover
from features.config import FeatureConfig, AudioEncoderConfig
from features.speed import with_speed_copies
from flows.preprocess import process_clip
part, nparts = int(sys.argv[1]), int(sys.argv[2])
recs = with_speed_copies(discover("ravdess", "/work/shared/data/ravdess_speech_16k", None).records, (0.9, 1.1))
cfg = FeatureConfig(audio_encoder=AudioEncoderConfig(name="whisper-base"))
t = time.time(); n = {"done": 0, "skipped": 0, "failed": 0}
for r in recs[part::nparts]:
    o = process_clip(r, "/work/stores/ravdess-whisper-base-sp", cfg, "cpu")
    n[o.status] += 1
print(part, n, time.time() - t, flush=True)
