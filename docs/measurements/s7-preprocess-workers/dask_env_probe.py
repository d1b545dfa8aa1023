"""Probe (as run): extraction CPU of the 6 CREMA-D clips (default config) in one fresh process, under the environment
given on the command line, user and system CPU apart (ffmpeg children included). Used to ask whether the
environment Dask's nanny gives its worker processes (MALLOC_TRIM_THRESHOLD_=65536, OMP/MKL/OPENBLAS_NUM_THREADS=1)
changes the per-clip cost. Warm-up (imports, MTCNN load, first clip) outside the clock."""

import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, "/work/main")
import torch  # noqa: E402

from features.config import FeatureConfig  # noqa: E402
from features.extract import extract_clip  # noqa: E402
from features.faces import FaceDetector  # noqa: E402
from features.manifest import ClipRecord  # noqa: E402

torch.set_num_threads(1)
cfg = FeatureConfig()
det = FaceDetector(cfg.face)
clips = sorted(Path("/work/shared/data/crema_d_sample/VideoFlash").glob("*.flv"))
extract_clip(ClipRecord("warm", "b", "s", "x", str(clips[0]), str(clips[0])), cfg, det)


def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime, s.ru_minflt + c.ru_minflt


u0, s0, f0 = cpu()
w0 = time.perf_counter()
for p in clips:
    extract_clip(ClipRecord(p.stem, "b", "s", "x", str(p), str(p)), cfg, det)
u1, s1, f1 = cpu()
env = {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
n = len(clips)
print(json.dumps({"env": env, "clips": n, "user_s_per_clip": (u1 - u0) / n, "sys_s_per_clip": (s1 - s0) / n,
                  "minor_faults_per_clip": (f1 - f0) / n, "wall_s_per_clip": (time.perf_counter() - w0) / n,
                  "load": os.getloadavg()}))
