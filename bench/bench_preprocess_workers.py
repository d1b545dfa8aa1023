"""`msata preprocess --workers 1` (one thread) against `--workers 2` (two local Dask worker processes).

A folder dataset of N clips is built in a temporary directory outside the repository: the CREMA-D sample's
.flv files symlinked N/6 times under distinct names, with a labels.csv for `--dataset folder`. The real CLI
then runs for each worker count into a fresh store, the counts alternating their order from one repeat to
the next, after one untimed warm-up run (the temporary Prefect API's database, the file cache).

Measured per run, for the CLI's whole process tree:
  wall_s            from start to exit of the CLI
  cpu_s             CPU-seconds (user + system) of the CLI and every descendant. This bench process is made a
                    child subreaper, so a descendant orphaned by its parent (e.g. a Dask worker process nobody
                    joined) is reparented here and reaped after the CLI exits: its CPU then lands in this
                    process's RUSAGE_CHILDREN too. cpu_s_waited is the part the CLI's tree itself waited for
                    (what RUSAGE_CHILDREN of the CLI alone would show); orphans lists what was reaped here.
  by_kind           CPU-seconds per kind of process (cli, dask_worker, prefect_api, ffmpeg, ...) as last
                    sampled from /proc every --sample-s (self and waited-for children): approximate, it
                    misses each process's last interval; it shows where a worker count's overhead goes
  peak_tree_rss_mb  the largest sum of resident memory over the tree at one sample; max_process_rss_mb is
                    the largest single process at one sample
  load              `uptime` before and after the run
The stores of all runs are then compared clip by clip (every stored array, array_equal, dtype and shape
included): a worker count must not change the features.

    nice -n 15 .venv/bin/python bench/bench_preprocess_workers.py --clips 24 --repeats 2 --out docs/measurements/s7-preprocess-workers
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = resource.getpagesize()


# ---------------------------------------------------------------- pure helpers (tests/bench/test_bench_preprocess_workers.py)
def build_folder_dataset(sources: list[Path], n_clips: int, root: Path) -> list[str]:
    """Symlink ``n_clips`` files under ``root`` (cycling through ``sources``, copy k as ``cKK_<name>``) and write
    ``root/labels.csv`` for the folder recipe; label and speaker from CREMA-D's ``<actor>_<sentence>_<EMO>_<level>``
    names. Returns the relative paths in CSV order."""
    if not sources:
        raise ValueError("no source clips to build the dataset from")
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips!r}")
    root.mkdir(parents=True, exist_ok=True)
    rows, names = ["path,label,speaker"], []
    for i in range(n_clips):
        src = sources[i % len(sources)]
        parts = src.stem.split("_")
        if len(parts) < 3:
            raise ValueError(f"{src.name}: not a CREMA-D name <actor>_<sentence>_<EMO>_<level>")
        name = f"c{i // len(sources):02d}_{src.name}"
        (root / name).symlink_to(src.resolve())
        rows.append(f"{name},{parts[2]},{parts[0]}")
        names.append(name)
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return names


def run_order(workers: list[int], repeat: int) -> list[int]:
    """The worker counts in the order of one repeat: as given on even repeats, reversed on odd ones."""
    return list(workers) if repeat % 2 == 0 else list(reversed(workers))


def parse_proc_stat(text: str) -> dict[str, int]:
    """Fields of /proc/PID/stat: ppid, self CPU and waited-for children's CPU (clock ticks), start time, RSS (pages).
    The command name (field 2) may hold spaces and parentheses, so the fields are counted after its last ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field k is rest[k - 3]
    return {
        "ppid": int(rest[1]),
        "self_ticks": int(rest[11]) + int(rest[12]),
        "children_ticks": int(rest[13]) + int(rest[14]),
        "start": int(rest[19]),
        "rss_pages": int(rest[21]),
    }


def process_kind(cmdline: list[str]) -> str:
    """What a process of the CLI's tree is, from its command line."""
    joined = " ".join(cmdline)
    name = Path(cmdline[0]).name if cmdline else ""
    if name in ("ffmpeg", "ffprobe"):
        return name
    if "uvicorn" in joined and "prefect" in joined:
        return "prefect_api"
    if "resource_tracker" in joined:
        return "mp_resource_tracker"
    if "spawn_main" in joined or "forkserver" in joined:
        return "dask_worker"  # LocalCluster(processes=True): multiprocessing spawn children of the nannies
    if "msata" in joined and "preprocess" in joined:
        return "cli"
    return name or "other"


def array_differences(a: object, b: object) -> dict[str, float | None]:
    """The fields where two ClipFeatures differ (arrays: dtype, shape and values, NaN equal to NaN), each with the
    largest absolute difference where both are arrays of one shape (None otherwise)."""
    import numpy as np

    diffs: dict[str, float | None] = {}
    for name in sorted(vars(a)):
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            same = (
                isinstance(x, np.ndarray)
                and isinstance(y, np.ndarray)
                and x.dtype == y.dtype
                and x.shape == y.shape
                and np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")
            )
        else:
            same = x == y
        if not same:
            comparable = isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.shape == y.shape
            diffs[name] = float(np.nanmax(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if comparable and x.size else None
    return diffs


# ---------------------------------------------------------------- process-tree sampling
@dataclass
class Seen:
    kind: str
    self_s: float = 0.0
    children_s: float = 0.0


@dataclass
class TreeSampler:
    """Follows every descendant of ``root_pid`` (by pid and start time, also after it is reparented)."""

    root_pid: int
    interval_s: float
    seen: dict[tuple[int, int], Seen] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    max_process_rss_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _sample(self) -> None:
        stats: dict[int, dict[str, int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stats[int(entry)] = parse_proc_stat(f.read())
                except (OSError, ValueError):
                    continue  # exited meanwhile
        known = {pid for pid, _ in self.seen}
        tree = {self.root_pid} if self.root_pid in stats else set()
        grew = True
        while grew:  # descendants of the root, plus processes already followed (reparented orphans)
            new = {pid for pid, s in stats.items() if pid not in tree and (s["ppid"] in tree or pid in known)}
            tree |= new
            grew = bool(new)
        rss = 0
        for pid in tree:
            s = stats[pid]
            key = (pid, s["start"])
            try:  # read every time: a child sampled between fork and exec still shows its parent's command line
                cmd = [c.decode(errors="replace") for c in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if c]
            except OSError:
                cmd = []
            kind = "cli" if pid == self.root_pid else process_kind(cmd)
            if key not in self.seen:
                self.seen[key] = Seen(kind)
            elif cmd:  # an exited process (zombie) has no command line: keep what it was
                self.seen[key].kind = kind
            self.seen[key].self_s = s["self_ticks"] / CLOCK_TICKS
            self.seen[key].children_s = s["children_ticks"] / CLOCK_TICKS
            rss += s["rss_pages"] * PAGE_BYTES
            self.max_process_rss_bytes = max(self.max_process_rss_bytes, s["rss_pages"] * PAGE_BYTES)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> None:
        self._stop.set()

    def by_kind(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for s in self.seen.values():
            row = out.setdefault(s.kind, {"processes": 0, "self_cpu_s": 0.0, "waited_children_cpu_s": 0.0})
            row["processes"] += 1
            row["self_cpu_s"] += s.self_s
            row["waited_children_cpu_s"] += s.children_s
        return out


# ---------------------------------------------------------------- one CLI run
def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


def _reap_orphans(grace_s: float) -> list[dict[str, object]]:
    """Reap descendants reparented to this subreaper; any still alive after ``grace_s`` is killed (a leak)."""
    reaped: list[dict[str, object]] = []
    deadline = time.monotonic() + grace_s
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid:
            reaped.append({"pid": pid, "status": status})
            continue
        if time.monotonic() > deadline:
            for child in _direct_children():
                os.kill(child, 9)
                reaped.append({"pid": child, "killed_after_s": grace_s})
            deadline = float("inf")
        time.sleep(0.1)


def _direct_children() -> list[int]:
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if parse_proc_stat(f.read())["ppid"] == me:
                        out.append(int(entry))
            except (OSError, ValueError):
                continue
    return out


def run_cli(workers: int, root: Path, store: Path, home: Path, sample_s: float, extra: list[str], log: Path) -> dict[str, object]:
    cmd = [str(Path(sys.executable).parent / "msata"), "preprocess", "--dataset", "folder", "--root", str(root), "--store", str(store)]
    cmd += ["--workers", str(workers), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MSATA_PREPROCESS_TORCH_THREADS")}
    env.update(MSATA_HOME=str(home), PYTHONUNBUFFERED="1")
    load_before = _uptime()  # outside the CPU window: uptime is a child too
    if _direct_children():
        raise RuntimeError(f"children left from an earlier run: {_direct_children()}")
    cpu0 = _children_cpu()
    start = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
    sampler = TreeSampler(proc.pid, sample_s)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    code = proc.wait()
    wall = time.perf_counter() - start
    cpu_waited = _children_cpu() - cpu0
    sampler.stop()
    thread.join()
    orphans = _reap_orphans(grace_s=60.0)
    kinds = {pid: s.kind for (pid, _), s in sampler.seen.items()}
    for o in orphans:
        o["kind"] = kinds.get(int(o["pid"]), "unknown")  # type: ignore[arg-type]
    cpu_total = _children_cpu() - cpu0
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}; its output is in {log}")
    return {
        "workers": workers,
        "command": " ".join(cmd),
        "wall_s": wall,
        "cpu_s": cpu_total,
        "cpu_s_waited": cpu_waited,
        "orphans": orphans,
        "by_kind": sampler.by_kind(),
        "peak_tree_rss_mb": sampler.peak_rss_bytes / 1e6,
        "max_process_rss_mb": sampler.max_process_rss_bytes / 1e6,
        "load_before": load_before,
        "load_after": _uptime(),
    }


def compare_stores(reference: Path, other: Path) -> dict[str, object]:
    from storage import FeatureStore

    a, b = FeatureStore.open(reference), FeatureStore.open(other)
    ids_a, ids_b = a.clip_ids(), b.clip_ids()
    differing = {}
    for clip_id in sorted(set(ids_a) & set(ids_b)):
        diff = array_differences(a.read(clip_id), b.read(clip_id))
        if diff:
            differing[clip_id] = diff
    return {
        "reference": str(reference.name),
        "store": str(other.name),
        "clips": len(ids_b),
        "same_clip_ids": ids_a == ids_b,
        "same_config_hash": a.config_hash == b.config_hash,
        "clips_with_differences": differing,
    }


def summarise(runs: list[dict[str, object]], n_clips: int) -> list[dict[str, object]]:
    rows = []
    for workers in sorted({int(r["workers"]) for r in runs}):  # type: ignore[call-overload]
        mine = [r for r in runs if r["workers"] == workers and r["clips"] == n_clips]
        if not mine:
            continue
        walls = [float(r["wall_s"]) for r in mine]  # type: ignore[arg-type]
        cpus = [float(r["cpu_s"]) for r in mine]  # type: ignore[arg-type]
        rows.append(
            {
                "clips": n_clips,
                "workers": workers,
                "runs": len(mine),
                "wall_s": walls,
                "cpu_s": cpus,
                "cpu_s_per_clip": [c / n_clips for c in cpus],
                "clips_per_min": [60 * n_clips / w for w in walls],
                "peak_tree_rss_mb": [float(r["peak_tree_rss_mb"]) for r in mine],  # type: ignore[arg-type]
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crema-dir", type=Path, default=REPO.parent / "shared" / "data" / "crema_d_sample" / "VideoFlash")
    parser.add_argument("--clips", default="24", help="dataset sizes, e.g. 6,24 (each run at each size; two sizes give the fixed cost)")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sample-s", type=float, default=0.2, help="/proc sampling interval")
    parser.add_argument("--cli-args", default="", help="extra msata preprocess options, e.g. '--face-search track'")
    parser.add_argument("--out", type=Path, required=True, help="folder for the json and the CLI log")
    parser.add_argument("--keep", action="store_true", help="keep the temporary datasets and stores")
    args = parser.parse_args()
    sizes = [int(v) for v in args.clips.split(",") if v.strip()]
    workers = [int(v) for v in args.workers.split(",") if v.strip()]
    sources = sorted(args.crema_dir.glob("*.flv"))
    if not sources:
        raise SystemExit(f"no .flv clips under {args.crema_dir} (the CREMA-D sample, ../shared/data)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "cli.log"
    tmp = Path(tempfile.mkdtemp(prefix="msata-workers-bench-"))
    home = tmp / "home"
    report: dict[str, object] = {"command": " ".join(sys.argv), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    report.update(cpus=os.cpu_count(), nice=os.nice(0), runs=[], comparisons=[], summary=[])
    extra = args.cli_args.split()
    try:
        for n in sizes:
            root = tmp / f"data{n}"
            build_folder_dataset(sources, n, root)
            print(f"# {n} clips under {root}", flush=True)
            if n == sizes[0]:  # warm-up, untimed: creates the Prefect database under MSATA_HOME, fills the file cache
                run_cli(1, root, tmp / "warmup", home, args.sample_s, [*extra, "--limit", "1"], log)
            stores: list[Path] = []
            for rep in range(args.repeats):
                for w in run_order(workers, rep):
                    store = tmp / f"store_n{n}_w{w}_r{rep}"
                    result = run_cli(w, root, store, home, args.sample_s, extra, log)
                    result.update(clips=n, repeat=rep, store=store.name)
                    report["runs"].append(result)  # type: ignore[union-attr]
                    stores.append(store)
                    print(
                        f"n={n} workers={w} rep={rep}: wall {result['wall_s']:.1f} s, CPU {result['cpu_s']:.1f} s "
                        f"(waited by the CLI's tree {result['cpu_s_waited']:.1f}), {60 * n / float(result['wall_s']):.1f} clips/min, "  # type: ignore[arg-type]
                        f"peak tree RSS {result['peak_tree_rss_mb']:.0f} MB, orphans {len(result['orphans'])}; "  # type: ignore[arg-type]
                        f"{result['load_before']} -> {result['load_after']}",
                        flush=True,
                    )
                    (args.out / "workers.json").write_text(json.dumps(report, indent=2))
            for store in stores[1:]:
                report["comparisons"].append(compare_stores(stores[0], store))  # type: ignore[union-attr]
                print(f"compare {stores[0].name} vs {store.name}: {report['comparisons'][-1]}", flush=True)  # type: ignore[index]
            report["summary"].extend(summarise(report["runs"], n))  # type: ignore[union-attr, arg-type]
        report["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        (args.out / "workers.json").write_text(json.dumps(report, indent=2))
        for row in report["summary"]:  # type: ignore[union-attr]
            print(json.dumps(row))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
