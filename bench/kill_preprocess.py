"""Reliability trial: `kill -9` a running `msata preprocess` at random points, then check the store.

    .venv/bin/python bench/kill_preprocess.py --trials 10 --clips 24 [--workers 2] [--seed 0]

One real `prefect server` (free port, throw-away home) serves every run. Each trial
starts `msata preprocess` on the same synthetic dataset and store, waits until this
run has committed at least one new clip (so the kill lands in the middle of the
work, not during start-up: an earlier version's kills all came before the first
commit), then a random 0-`--max-extra` seconds more, and SIGKILLs the msata process
(and its process group). After every kill the store
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


def committed(store: Path) -> int:
    """Clips committed so far (0 before the store exists); read-only, safe while msata writes."""
    from storage import FeatureStore, StoreError

    try:
        return len(FeatureStore.open(store).clip_ids())
    except StoreError:
        return 0


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
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-extra", type=float, default=8.0, help="latest kill, seconds after the run's first commit")
    parser.add_argument("--first-commit-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from features.synthetic import make_synthetic_dataset

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="msata-kill-"))
    classes = ("happy", "sad")
    raw = make_synthetic_dataset(
        tmp / "raw", n_speakers=max(1, args.clips // len(classes)), clips_per_class=1, classes=classes, duration_s=1.5, size=(160, 120)
    )
    store = tmp / "store"
    started: list[subprocess.Popen] = []
    trials = []
    try:
        env = start_prefect_server(tmp, started)
        command = [MSATA, "preprocess", "--dataset", "folder", "--root", str(raw), "--store", str(store), "--workers", str(args.workers)]
        for trial in range(args.trials):
            before = committed(store)
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            start = time.monotonic()
            while proc.poll() is None and committed(store) <= before and time.monotonic() - start < args.first_commit_timeout:
                time.sleep(0.2)
            first_commit_s = time.monotonic() - start
            extra = rng.uniform(0.0, args.max_extra)
            time.sleep(extra)
            at_kill = committed(store)
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
            trials.append(
                {
                    "trial": trial,
                    "first_commit_s": round(first_commit_s, 1),
                    "kill_extra_s": round(extra, 2),
                    "finished_first": finished,
                    "stored_before": before,
                    "stored_at_kill": at_kill,
                    "stored": stored,
                    "staging_left": staging,
                }
            )
            print(json.dumps(trials[-1]), flush=True)
        final = subprocess.run(command, env=env | {"COLUMNS": "200"}, capture_output=True, text=True, timeout=1800)
        stored = check_store(store)
        staging = sorted(p.name for p in (store / "_staging").iterdir())
        ok = final.returncode == 0 and stored == args.clips and not staging and " 0 failed" in final.stdout
        killed_mid_run = sum(1 for t in trials if not t["finished_first"] and t["stored_at_kill"] > t["stored_before"])
        summary = {
            "ok": ok,
            "trials": len(trials),
            "killed_after_a_commit": killed_mid_run,
            "final_rc": final.returncode,
            "stored": stored,
            "expected": args.clips,
            "staging_left": staging,
            "final_line": final.stdout.strip().splitlines()[:1],
        }
        print(json.dumps(summary))
        if not ok:
            print(final.stdout[-3000:], final.stderr[-3000:], file=sys.stderr)
            sys.exit(1)
    finally:
        stop_all(started)


if __name__ == "__main__":
    main()
