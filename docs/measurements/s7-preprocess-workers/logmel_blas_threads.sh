#!/bin/sh
# Reproduction: the log-mel of one CREMA-D clip under OpenBLAS's default thread count (2 on this VM) and under 1
# thread (what Dask's nanny sets in its worker processes: distributed.nanny.pre-spawn-environ OPENBLAS_NUM_THREADS=1).
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/python docs/measurements/s7-preprocess-workers/logmel_blas_threads.py /tmp/lm_default.npy
OPENBLAS_NUM_THREADS=1 .venv/bin/python docs/measurements/s7-preprocess-workers/logmel_blas_threads.py /tmp/lm_1t.npy
OPENBLAS_NUM_THREADS=2 .venv/bin/python docs/measurements/s7-preprocess-workers/logmel_blas_threads.py /tmp/lm_2t.npy
.venv/bin/python -c "
import numpy as np
a, b, c = (np.load(f'/tmp/lm_{k}.npy') for k in ('default', '1t', '2t'))
print(a.shape, 'default vs 1 thread: array_equal', np.array_equal(a, b), 'max abs', np.abs(a - b).max(), 'share of values differing', (a != b).mean())
print('default vs 2 threads: array_equal', np.array_equal(a, c))
"
