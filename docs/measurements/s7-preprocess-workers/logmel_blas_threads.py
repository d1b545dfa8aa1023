import sys, numpy as np
sys.path.insert(0, "/work/main")
from features.config import AudioConfig
from features.decode import decode_audio
from features.audio import log_mel
path = "/work/shared/data/crema_d_sample/VideoFlash/1001_DFA_ANG_XX.flv"
wave = decode_audio(path)
wave = getattr(wave, "samples", wave)
lm, _ = log_mel(np.asarray(wave), AudioConfig())
np.save(sys.argv[1], lm)
