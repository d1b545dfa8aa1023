#!/bin/sh
# Each environment twice, alternating (nice -n 15 on a shared 2-vCPU VM).
cd "$(dirname "$0")/../../.."
P=docs/measurements/s7-preprocess-workers/dask_env_probe.py
for rep in 1 2; do
  nice -n 15 .venv/bin/python $P
  MALLOC_TRIM_THRESHOLD_=65536 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice -n 15 .venv/bin/python $P
  MALLOC_TRIM_THRESHOLD_=65536 nice -n 15 .venv/bin/python $P
done
