"""Reliability trial: `kill -9` a running `msata preprocess` at random points, then check the store.

    .venv/bin/python bench/kill_preprocess.py --trials 10 --clips 8 [--workers 2] [--seed 0]

One real `prefect server` (free port, throw-away home) serves every run. Each trial
starts `msata preprocess` on the same synthetic dataset and store, waits a random
0.5-`--max-wait` seconds, and SIGKILLs the msata process. After every kill the store
must open, every committed clip must read back whole, and the manifest must list
exactly the committed clips. A final run must finish the dataset: every clip stored,
none failed, no staging leftovers. Prints one line per trial and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "flows"))
sys.path.insert(0, str(REPO))

from flow_servers import MSATA, start_prefect_server, stop_all  # noqa: E402


def check_store(store: Path) -> int:
    """Every committed clip reads back; the manifest lists exactly them. Returns their number."""
    from storage import FeatureStore, StoreError

    try:
        opened = FeatureStore.open(store)
    except StoreError:  # killed before the store's root metadata was published
        return 0
    ids = opened.clip_ids()
    for clip_id in ids:
        clip = opened.read(clip_id)
        assert clip.clip_id == clip_id
    manifest = opened.manifest()
    assert sorted(manifest["clip_id"]) == ids, (sorted(manifest["clip_id"]), ids)
    return len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-wait", type=float, default=20.0, help="latest kill, seconds after the start")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from features.synthetic import make_synthetic_dataset

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="msata-kill-"))
    classes = ("happy", "sad")
    raw = make_synthetic_dataset(tmp / "raw", n_speakers=max(1, args.clips // len(classes)), clips_per_class=1, classes=classes, duration_s=2.0, size=(160, 120))
    store = tmp / "store"
    started: list[subprocess.Popen] = []
    trials = []
    try:
        env = start_prefect_server(tmp, started)
        command = [MSATA, "preprocess", "--dataset", "folder", "--root", str(raw), "--store", str(store), "--workers", str(args.workers)]
        for trial in range(args.trials):
            wait = rng.uniform(0.5, args.max_wait)
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(wait)
            finished = proc.poll() is not None
            if not finished:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if args.workers > 1:  # local Dask processes lose their parent: end what is left of the group
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            stored = check_store(store)
            staging = len(list((store / "_staging").iterdir())) if (store / "_staging").is_dir() else 0
            trials.append({"trial": trial, "kill_after_s": round(wait, 2), "finished_first": finished, "stored": stored, "staging_left": staging})
            print(json.dumps(trials[-1]), flush=True)
        final = subprocess.run(command, env=env | {"COLUMNS": "200"}, capture_output=True, text=True, timeout=1800)
        stored = check_store(store)
        staging = sorted(p.name for p in (store / "_staging").iterdir())
        ok = final.returncode == 0 and stored == args.clips and not staging and " 0 failed" in final.stdout
        summary = {"ok": ok, "trials": len(trials), "final_rc": final.returncode, "stored": stored, "expected": args.clips, "staging_left": staging,
                   "final_line": final.stdout.strip().splitlines()[:1]}
        print(json.dumps(summary))
        if not ok:
            print(final.stdout[-3000:], final.stderr[-3000:], file=sys.stderr)
            sys.exit(1)
    finally:
        stop_all(started)


if __name__ == "__main__":
    main()
