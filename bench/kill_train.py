"""Reliability trial: `kill -9` a running `msata train` at random points, resume, compare with an uninterrupted run.

    .venv/bin/python bench/kill_train.py --trials 10 [--epochs 30] [--seed 0]

One real `prefect server` (free port, throw-away home) serves every run. A tiny
feature store (tests/training_fixtures.py, 4 speakers x 3 clips, tiny model, CPU)
is trained with `msata train --folds 2 --resume --run-dir RUN`. Each trial starts that
command, waits for a point (``kill_plan``: mostly an epoch checkpoint, some right after prepare, one fold end,
and last the end of the final fold, before finalize) of the experiment to be reached *by this run* (the
experiment spec written, an epoch checkpointed, a fold finished), then a random
0-`--max-extra` seconds more, and SIGKILLs the process group. After the trials one
more run finishes the experiment. The same command on a fresh run directory, never
killed (and not registered), is the reference: every fold's best epoch, validation UAR and test metrics
must be equal, and MLflow must hold one parent run (FINISHED), one run per fold
(FINISHED) and one registered version. Prints one JSON line per trial and a summary;
the Prefect flow runs' final states are reported too (a SIGKILLed flow run cannot
report its own end).
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
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from flow_servers import MSATA, start_prefect_server, stop_all  # noqa: E402

# Points of *this* run a kill waits for (a file under the run directory written after the run started), then
# a random extra delay. Files left by earlier trials do not count: an earlier version waited for paths that
# already existed after the first trial, and its kills then all landed during start-up.
MILESTONES = {
    "prepared": ("experiment.json",),  # prepare_experiment rewrites it on every (resumed) run
    "epoch": ("fold_0/last.pt", "fold_1/last.pt"),  # an epoch of the running fold was checkpointed
    "fold": ("fold_0/result.json", "fold_1/result.json"),  # a fold finished
}


def kill_plan(trials: int, rng: random.Random) -> list[str]:
    """Which milestone each trial waits for: mostly epochs, some right after prepare, one fold end among them
    (shuffled), and last a kill right after the final fold, between training and finalize/registration."""
    if trials < 2:
        return ["epoch"] * trials
    n = trials - 1
    plan = ["prepared"] * round(n * 2 / 9) + ["fold"]
    plan += ["epoch"] * (n - len(plan))
    rng.shuffle(plan)
    return plan + ["fold"]


def reached(run_dir: Path, milestone: str, since: float) -> bool:
    for name in MILESTONES[milestone]:
        try:
            if (run_dir / name).stat().st_mtime > since:
                return True
        except FileNotFoundError:
            continue
    return False


def fold_results(run_dir: Path) -> list[dict]:
    result = json.loads((run_dir / "cv_result.json").read_text())
    return [{k: f[k] for k in ("index", "best_epoch", "best_val_uar", "epochs_run", "test", "confusion")} for f in result["folds"]]


def mlflow_state(home: Path, run_dir: Path) -> dict:
    """Status of every run of ``run_dir``'s experiment (its parent and the parent's fold runs), all parents, and the versions."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("msata-crema-d")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    mine = [r.info.run_id for r in parents if r.data.tags.get("msata.run_dir") == str(run_dir)]
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in mine]
    versions = client.search_model_versions("name='msata-crema-d'")
    return {
        "parents": sorted((r.data.tags.get("msata.run_dir", ""), r.info.status) for r in parents),
        "killed_experiment": sorted(
            [("parent", r.info.status) for r in parents if r.info.run_id in mine] + [("fold", r.info.status) for r in folds]
        ),
        "all_runs": len(runs),
        "versions": sorted((v.version, v.run_id) for v in versions),
    }


def prefect_states(api_url: str) -> dict[str, int]:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    counts: dict[str, int] = {}
    for run in runs:
        name = run.state.type.value if run.state else "NONE"
        counts[name] = counts.get(name, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30, help="per fold (no early stop): enough work for every kill to land in training")
    parser.add_argument("--max-extra", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from training_fixtures import TINY_MODEL, build_tiny_store

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="msata-kill-train-"))
    store = tmp / "store"
    build_tiny_store(store, n_speakers=4, clips_per_speaker=3)
    config = tmp / "run.json"
    train = {
        "epochs": args.epochs,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_epochs": 0.5,
        "num_workers": 0,
        "max_duration_s": 1.5,
        "patience": 50,
    }
    config.write_text(json.dumps({"train": train, "model": TINY_MODEL}))
    started: list[subprocess.Popen] = []
    trials = []

    def command(run_dir: Path, *extra: str) -> list[str]:
        return [
            MSATA,
            "train",
            "--store",
            str(store),
            "--dataset",
            "crema-d",
            "--folds",
            "2",
            "--config",
            str(config),
            "--run-dir",
            str(run_dir),
            "--resume",
            *extra,
        ]

    try:
        env = start_prefect_server(tmp, started)
        env = {k: v for k, v in env.items() if k != "PREFECT_LOGGING_LEVEL"} | {"COLUMNS": "200"}
        killed_dir = tmp / "killed"
        for trial, milestone in enumerate(kill_plan(args.trials, rng)):
            extra = rng.uniform(0.0, args.max_extra)
            start, wall_start = time.monotonic(), time.time()
            proc = subprocess.Popen(
                command(killed_dir), env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            while proc.poll() is None and not reached(killed_dir, milestone, wall_start):
                time.sleep(0.1)
            time.sleep(extra)
            finished = proc.poll() is not None
            if not finished:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            done = sorted(p.parent.name for p in killed_dir.glob("fold_*/result.json"))
            trials.append(
                {
                    "trial": trial,
                    "milestone": milestone,
                    "extra_s": round(extra, 2),
                    "killed_after_s": round(time.monotonic() - start, 1),
                    "finished_first": finished,
                    "rc": proc.returncode,
                    "folds_done": done,
                    "finalized": (killed_dir / "cv_result.json").exists(),
                }
            )
            print(json.dumps(trials[-1]), flush=True)
        final = subprocess.run(command(killed_dir), env=env, cwd=tmp, capture_output=True, text=True, timeout=1800)
        reference = subprocess.run(
            command(tmp / "reference", "--no-register"), env=env, cwd=tmp, capture_output=True, text=True, timeout=1800
        )
        for name, run in (("final", final), ("reference", reference)):
            if run.returncode != 0:
                print(f"{name} run failed (rc {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}", file=sys.stderr)
                sys.exit(1)
        resumed, uninterrupted = fold_results(killed_dir), fold_results(tmp / "reference")
        mlflow = mlflow_state(tmp / "home", killed_dir)
        expected = [("fold", "FINISHED"), ("fold", "FINISHED"), ("parent", "FINISHED")]
        ok = (
            resumed == uninterrupted
            and mlflow["killed_experiment"] == expected
            and mlflow["all_runs"] == 6
            and len(mlflow["versions"]) == 1
        )
        summary = {
            "ok": ok,
            "trials": len(trials),
            "killed": sum(not t["finished_first"] for t in trials),
            "folds_equal": resumed == uninterrupted,
            "mlflow_parents": mlflow["parents"],
            "killed_experiment_runs": mlflow["killed_experiment"],
            "mlflow_runs_total": mlflow["all_runs"],
            "registered_versions": mlflow["versions"],
            "prefect_flow_runs": prefect_states(env["PREFECT_API_URL"]),
        }
        print(json.dumps(summary))
        if resumed != uninterrupted:
            print(json.dumps({"resumed": resumed, "uninterrupted": uninterrupted}), file=sys.stderr)
        if not ok:
            sys.exit(1)
    finally:
        stop_all(started)


if __name__ == "__main__":
    main()
