#!/bin/bash
# Start msata preprocess with SIGINT ignored (background job without job control) and sample its signal masks.
cd /work/main
rm -rf /tmp/sigprobe && mkdir -p /tmp/sigprobe
.venv/bin/python -c "
from features.synthetic import make_synthetic_dataset
make_synthetic_dataset('/tmp/sigprobe/raw', n_speakers=2, clips_per_class=1, classes=('happy','sad'), duration_s=8.0, size=(320,240))
" > /dev/null 2>&1
.venv/bin/msata preprocess --dataset folder --root /tmp/sigprobe/raw --store /tmp/sigprobe/store > /tmp/sigprobe/cli.log 2>&1 &
pid=$!
for i in $(seq 1 40); do
  if [ -r /proc/$pid/status ]; then echo "t=$i $(grep -E 'SigIgn|SigCgt' /proc/$pid/status | tr '\n' ' ')"; fi
  sleep 2
done
kill -9 $pid 2>/dev/null
