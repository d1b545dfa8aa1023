#!/bin/sh
# End-to-end check of the cause of the log-mel difference: --workers 1 with OpenBLAS at 1 thread (as Dask's
# nanny sets for its workers) against the --workers 2 store of the bench run; and the two --workers 2 stores.
set -e
cd "$(dirname "$0")/../../.."
T=/tmp/msata-workers-bench-pnp64sv_
rm -rf $T/store_n2_w1_blas1
MSATA_HOME=$T/home OPENBLAS_NUM_THREADS=1 nice -n 15 .venv/bin/msata preprocess --dataset folder --root $T/data2 --store $T/store_n2_w1_blas1 --workers 1
nice -n 15 .venv/bin/python -c "
import sys; sys.path.insert(0, '.')
from pathlib import Path
import numpy as np
from bench.bench_preprocess_workers import compare_stores
from storage import FeatureStore
T = Path('$T')
for a, b in (('store_n2_w2_r0', 'store_n2_w1_blas1'), ('store_n2_w1_r0', 'store_n2_w1_blas1'), ('store_n12_w2_r0', 'store_n12_w2_r1'), ('store_n2_w2_r0', 'store_n2_w2_r1')):
    print(a, 'vs', b, compare_stores(T / a, T / b))
a, b = FeatureStore.open(T / 'store_n12_w1_r0'), FeatureStore.open(T / 'store_n12_w2_r0')
x = np.concatenate([a.read(c).logmel.ravel() for c in a.clip_ids()]); y = np.concatenate([b.read(c).logmel.ravel() for c in b.clip_ids()])
d = x != y
print('12-clip stores w1_r0 vs w2_r0: logmel values', x.size, 'differing', int(d.sum()), f'({d.mean():.4f})', 'max abs', float(np.abs(x - y).max()), 'largest relative', float((np.abs(x - y)[d] / np.abs(x[d])).max()))
"
