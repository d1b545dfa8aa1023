"""Peak memory of preprocessing one long 1080p clip, with and without spilling its face crops to disk.

For each length (--seconds) a 1080p H.264 clip is made by looping a CREMA-D take (bench_preprocess's
looped_clips: a real face, real speech), cached in --clips-dir. Each case runs in a fresh child process
what a preprocessing worker does for one clip (flows/preprocess.py's process_clip without Prefect):
FeatureStore.create on a new local store, extract_clip(..., spill_dir=store.spill_dir), store.write.
Cases: spill "on" (features.spill.SPILL_BYTES as shipped) and "off" (the bound set to 1 TiB, which is the
code before spilling: every crop in memory, joined once at the end), for each --search mode.

Recorded per case (json, one file per case under --out; summary.json is rebuilt from them after each case):
  ru_maxrss_mb            peak resident set of the child (getrusage RUSAGE_SELF)
  children_ru_maxrss_mb   largest peak of its own children (RUSAGE_CHILDREN: ffmpeg and ffprobe, but a forked
                          child counts the parent pages it inherited before exec, so ~ this process at that time)
  rss_per_chunk           [frames decoded so far, RSS MB] sampled as each decoded chunk is handed over
  rss_mb_*                RSS after imports, after extraction, after the store write, after the features are dropped
  sampled_peak_mb_*       largest RSS seen by a 0.1 s sampler thread during extraction / during the write
  cpu_s, wall_s, frames, crops_mb, spilled, load_average (before and after)
summary.json, per case: those peaks, the RSS at 10/25/50/75/100% of the frames, and the growth in MB per
frame over frames 0.7 n to 0.95 n (a least-squares slope: ~0.03 is the crops staying in memory, ~0 is bounded).

torch runs at one intra-op thread, as preprocessing workers do.

    nice -n 15 .venv/bin/python bench/bench_long_clip_memory.py --seconds 30,120 --spill on,off --out docs/measurements/s7-long-clip-memory
    nice -n 15 .venv/bin/python bench/bench_long_clip_memory.py --seconds 30 --search full --spill on,off --out docs/measurements/s7-long-clip-memory
    nice -n 15 .venv/bin/python bench/bench_long_clip_memory.py --seconds 600 --spill on --out docs/measurements/s7-long-clip-memory
    nice -n 15 .venv/bin/python bench/bench_long_clip_memory.py --seconds 30 --search full --spill on --spill-mib 8 --out docs/measurements/s7-long-clip-memory
    nice -n 15 .venv/bin/python bench/bench_long_clip_memory.py --seconds 30 --search track --spill on --spill-mib 8 --out docs/measurements/s7-long-clip-memory
    .venv/bin/python bench/bench_long_clip_memory.py --summarize --out docs/measurements/s7-long-clip-memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SPILL_OFF_BYTES = 2**40  # "off": a bound no clip reaches (1 TiB)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


class Sampler(threading.Thread):
    """Largest RSS seen every ``period`` seconds, per phase (the phase name is set by the caller)."""

    def __init__(self, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.period, self.phase, self.peaks = period, "start", {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss_mb())
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def child(args: argparse.Namespace) -> None:
    """One case in this (fresh) process; prints one JSON line."""
    import gc
    from dataclasses import replace

    import torch

    from features import extract, spill
    from features.config import FeatureConfig
    from features.manifest import ClipRecord
    from storage import FeatureStore

    torch.set_num_threads(1)
    if args.spill == "off":
        spill.SPILL_BYTES = SPILL_OFF_BYTES
    elif args.spill_mib:
        spill.SPILL_BYTES = int(args.spill_mib * 2**20)
    per_chunk: list[tuple[int, float]] = []
    decode = extract.iter_video_frames

    def sampled_frames(*a, **k):  # the decoder, with RSS taken as each chunk is handed over
        n = 0
        for frames, times in decode(*a, **k):
            per_chunk.append((n, round(rss_mb(), 1)))
            n += len(frames)
            yield frames, times
        per_chunk.append((n, round(rss_mb(), 1)))

    extract.iter_video_frames = sampled_frames
    base = FeatureConfig()
    config = replace(base, face=replace(base.face, search=args.search))
    path = args.clip
    record = ClipRecord(Path(path).stem, "bench", "s", "neutral", path, path)
    out: dict[str, object] = {"clip": path, "spill": args.spill, "search": args.search, "spill_bytes": spill.SPILL_BYTES}
    out["load_average_before"] = list(os.getloadavg())
    out["rss_mb_after_imports"] = rss_mb()
    sampler = Sampler()
    sampler.start()
    wall, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="msata-bench-store-") as tmp:
        store = FeatureStore.create(os.path.join(tmp, "store.zarr"), config)
        sampler.phase = "extract"
        features = extract.extract_clip(record, config, spill_dir=store.spill_dir)
        out["rss_mb_after_extract"] = rss_mb()
        out["frames"] = int(len(features.video_times)) if features.video_times is not None else 0
        out["crops_mb"] = features.face_crops.nbytes / 1e6 if features.face_crops is not None else 0.0
        out["spilled"] = type(features.face_crops).__name__ == "memmap"
        sampler.phase = "write"
        store.write(record, features)
        out["rss_mb_after_write"] = rss_mb()
        sampler.phase = "end"
        del features
        gc.collect()
        out["rss_mb_after_drop"] = rss_mb()
        out["stored_frames"] = int(store.manifest()["n_video_frames"].iloc[0])
    out["wall_s"] = time.perf_counter() - wall
    out["cpu_s"] = time.process_time() - cpu
    sampler.stop()
    out["sampled_peak_mb_extract"] = sampler.peaks.get("extract", 0.0)
    out["sampled_peak_mb_write"] = sampler.peaks.get("write", 0.0)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out["ru_maxrss_mb"] = me.ru_maxrss * 1024 / 1e6  # Linux: KiB; MB like the RSS samples
    out["children_ru_maxrss_mb"] = kids.ru_maxrss * 1024 / 1e6
    out["children_cpu_s"] = kids.ru_utime + kids.ru_stime
    out["load_average_after"] = list(os.getloadavg())
    out["rss_per_chunk"] = per_chunk
    print(json.dumps(out))


def clips_for(seconds: list[float], clips_dir: Path, crema_dir: Path) -> dict[float, Path]:
    from bench_preprocess import loop_group_name, looped_clips

    clips_dir.mkdir(parents=True, exist_ok=True)
    wanted = {sec: clips_dir / f"{loop_group_name(1080, sec)}.mp4" for sec in seconds}
    missing = [sec for sec, path in wanted.items() if not path.exists()]
    if missing:
        takes = sorted(crema_dir.glob("*.flv"))
        if not takes:
            raise SystemExit(f"no CREMA-D .flv in {crema_dir} (--crema-dir) to loop")
        looped_clips(clips_dir, takes[0], missing, (1080,))
    return wanted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", default="30,120", help="clip lengths in seconds, e.g. 30,120,600")
    parser.add_argument("--spill", default="on,off", help="on (shipped bound), off (1 TiB bound: everything in memory), or both")
    parser.add_argument(
        "--spill-mib", type=float, default=0, help="'on' with this bound in MiB instead of the shipped one (shorter clips spill)"
    )
    parser.add_argument("--search", default="track", help="FaceConfig.search for every case (track keeps 10 minutes affordable)")
    parser.add_argument("--out", default="", help="folder for one json per case and summary.json (none: print only)")
    parser.add_argument("--clips-dir", default=os.path.join(tempfile.gettempdir(), "msata-long-clips"), help="cache of the looped clips")
    parser.add_argument("--crema-dir", default=str(REPO.parent / "shared" / "data" / "crema_d_sample" / "VideoFlash"))
    parser.add_argument("--summarize", action="store_true", help="only rebuild --out/summary.json from the case files there")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clip", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.summarize:
        summarize(Path(args.out))
        print((Path(args.out) / "summary.json").read_text())
        return
    seconds = [float(s) for s in args.seconds.split(",") if s.strip()]
    modes = [m.strip() for m in args.spill.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("on", "off")]
    if bad or not seconds:
        raise SystemExit(f"--spill takes on/off (got {bad}); --seconds needs at least one length (got {args.seconds!r})")
    clips = clips_for(seconds, Path(args.clips_dir), Path(args.crema_dir))
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for sec in seconds:
        for mode in modes:
            name = f"{sec:g}s_{args.search}_spill-{mode}" + (f"-{args.spill_mib:g}MiB" if mode == "on" and args.spill_mib else "")
            cmd = [sys.executable, __file__, "--child", "--clip", str(clips[sec]), "--spill", mode, "--search", args.search]
            cmd += ["--spill-mib", str(args.spill_mib)]
            print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC {name}: running", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["command"] = " ".join(sys.argv)
            result["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            print(f"  {json.dumps(summary_row(result))}", flush=True)
            if out_dir:
                (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
                summarize(out_dir)


def summary_row(result: dict) -> dict:
    """The figures of one case: peaks, RSS at fractions of the clip, and the growth per frame over frames 0.7 n to 0.95 n."""
    keys = ("frames", "crops_mb", "spilled", "ru_maxrss_mb", "sampled_peak_mb_extract", "sampled_peak_mb_write")
    keys += ("rss_mb_after_imports", "rss_mb_after_extract", "rss_mb_after_write", "cpu_s", "wall_s", "load_average_before")
    row = {k: result[k] for k in keys}
    # Samples taken while a decoded chunk is alive (the last one is taken after the decoder has finished).
    samples = np.array(result["rss_per_chunk"][:-1], dtype=np.float64).reshape(-1, 2)
    n = result["frames"]
    row["rss_mb_at_fraction_of_frames"] = {
        f"{q:g}": float(samples[np.searchsorted(samples[:, 0], q * n, side="right") - 1, 1]) for q in (0.1, 0.25, 0.5, 0.75, 1.0)
    }
    # Frames 0.7 n to 0.95 n: past the spill of a 120-s clip (frame ~2,430 of 3,596); the clip's last chunk is
    # shorter (a smaller frame buffer alive), so the end is left out.
    late = samples[(samples[:, 0] >= 0.7 * n) & (samples[:, 0] <= 0.95 * n)]
    row["mb_per_frame_70_to_95pct"] = float(np.polyfit(late[:, 0], late[:, 1], 1)[0]) if len(late) > 2 else None
    return row


def summarize(out_dir: Path) -> None:
    """summary.json rebuilt from every case file in ``out_dir`` (so several runs of this bench can share it)."""
    rows = {p.stem: summary_row(json.loads(p.read_text())) for p in sorted(out_dir.glob("*.json")) if p.name != "summary.json"}
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
