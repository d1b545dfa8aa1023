"""Preprocessing throughput: ffmpeg decode floor vs full feature extraction, side by side.

For every clip (the CREMA-D sample when present; 1080p clips of --loop-seconds made by
looping a CREMA-D take, scaled, so that the face is real; else synthetic talking faces)
the modes run back to back, so they see the same machine load. --heights adds a resolution axis:
the looped clips at every height given (16:9, e.g. 1080,720), each length at each height:

  floor_decode   the issue's floor: the audio to 16 kHz + every full-resolution RGB frame through a
                 plain ffmpeg pipe (no showinfo, nothing else); two ffmpeg processes, the file probed
                 outside the clock (its stream index and frame size)
  floor_ffprobe  the same plus the ffprobe call extraction makes (this bench's floor until issue 13's
                 ffprobe work; x floor_ffprobe is what the earlier tables call "x floor")
  full      extract_clip, default FeatureConfig (MTCNN on every frame, the whole frame searched)
  near      the same with face.search="near" (searched near the previous face)
  track     the same with face.search="track" (O-net alone on the previous face's box between
            whole-frame searches)
  every3    extract_clip with detect_every=3 (interpolation between detections)
  min60     extract_clip with detect_every=1 and MTCNN min_face_size=60 (--min-face)
  track_separate  track with audio and video from two ffmpeg processes, as before issue 13's
            one-process decode (features.extract.COMBINED_DECODE = False; --separate)

--modes keeps only the named extraction modes (the two floors always run).
With --json the file is rewritten after every group, so a run stopped early keeps the groups it finished.

Resident memory after each clip is recorded too (rss_mb_after), to show that it does
not grow with the clip's length.

CPU seconds include ffmpeg children (resource.getrusage(RUSAGE_CHILDREN)); the ratios
compare CPU seconds per clip, which are robust to other load on the machine. Every mode
is given against both floors.

    .venv/bin/python bench/bench_preprocess.py --json bench/results/preprocess.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features import extract  # noqa: E402
from features.config import FaceConfig, FeatureConfig  # noqa: E402
from features.decode import MediaInfo, decode_audio, probe  # noqa: E402
from features.extract import extract_clip  # noqa: E402
from features.faces import Detections, FaceDetector  # noqa: E402
from features.manifest import ClipRecord  # noqa: E402
from features.synthetic import make_talking_face_clip, speaker_style  # noqa: E402

# The two floors every mode is given against (see the module docstring).
FLOORS = ("floor_decode", "floor_ffprobe")


class TimedDetector(FaceDetector):
    """FaceDetector that also adds up the CPU time spent detecting (MTCNN and the downscale before it,
    for every search mode: detect_sequence and detect, the outermost call only)."""

    mtcnn_cpu_s: float = 0.0
    _depth: int = 0

    def _timed(self, fn: Callable[[np.ndarray], Detections], frames: np.ndarray) -> Detections:
        start = time.process_time()
        self._depth += 1
        try:
            return fn(frames)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.mtcnn_cpu_s += time.process_time() - start

    def detect(self, frames: np.ndarray) -> Detections:
        return self._timed(super().detect, frames)

    def detect_sequence(self, frames: np.ndarray) -> Detections:
        return self._timed(super().detect_sequence, frames)


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def decode_floor(path: str, info: MediaInfo | None = None) -> int:
    """The audio and every RGB frame through a plain ffmpeg pipe, read in 64 MiB blocks; ffprobe first
    unless ``info`` is given (then only its audio stream index and frame size are used)."""
    info = info or probe(path)
    if info.has_audio:
        decode_audio(path, info=info)
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", path, "-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    total = 0
    while block := proc.stdout.read(64 * 2**20):  # type: ignore[union-attr]
        total += len(block)
    proc.wait()
    return total // (3 * (info.width or 1) * (info.height or 1))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def parse_numbers(text: str, name: str) -> list[float]:
    """'5,30,120' -> [5.0, 30.0, 120.0]; '' -> []; anything not a positive number raises, naming the option."""
    values = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not a number (in {text!r})") from None
        if not value > 0:
            raise ValueError(f"{name}: {item!r} must be > 0 (in {text!r})")
        values.append(value)
    return values


def frame_size_for_height(height: int) -> tuple[int, int]:
    """16:9 frame of this height, both sides even (libx264 with yuv420p needs even sides): 1080 -> 1920x1080,
    720 -> 1280x720, 480 -> 854x480."""
    if height < 2 or height % 2:
        raise ValueError(f"height must be an even number >= 2, got {height!r}")
    return 2 * round(height * 16 / 9 / 2), height


def loop_group_name(height: int, seconds: float) -> str:
    """Group (and file) name of a looped clip; 1080p keeps the name the earlier tables used."""
    return f"loop{height}_{seconds:g}s"


def looped_clips(root: Path, source: Path, seconds: list[float], heights: tuple[int, ...] = (1080,)) -> list[Path]:
    """16:9 H.264 + AAC clips of the given lengths at each of the given heights (length-major order), a CREMA-D
    take looped (real face, real speech)."""
    mp4 = root / "take.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-i",
            str(source),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-c:a",
            "aac",
            str(mp4),
        ],
        check=True,
    )
    out = []
    for sec, height in ((sec, height) for sec in seconds for height in heights):
        width, height = frame_size_for_height(height)
        path = root / f"{loop_group_name(height, sec)}.mp4"
        subprocess.run(
            [
                "ffmpeg",
                "-nostdin",
                "-loglevel",
                "error",
                "-y",
                "-stream_loop",
                "-1",
                "-i",
                str(mp4),
                "-t",
                f"{sec}",
                "-vf",
                f"scale={width}:{height}",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-c:a",
                "aac",
                str(path),
            ],
            check=True,
        )
        out.append(path)
    return out


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - wall, _cpu() - cpu


def synthetic_clips(root: Path, n: int, duration: float, fps: str, size: tuple[int, int]) -> list[Path]:
    paths = []
    for i in range(n):
        label = ("neutral", "happy", "sad", "angry")[i % 4]
        clip = make_talking_face_clip(root / f"syn{i}.mp4", duration, fps, size[0], size[1], label=label, speaker=speaker_style(i), seed=i)
        paths.append(clip.path)
    return paths


def run(args: argparse.Namespace, on_group: Callable[[dict, str], None] | None = None) -> dict:
    """Every group's figures; ``on_group(report, group)`` is called after each group with the report so far."""
    torch.set_num_threads(args.torch_threads)
    seconds = parse_numbers(args.loop_seconds, "--loop-seconds")
    heights = tuple(int(h) for h in parse_numbers(args.heights, "--heights"))
    groups: dict[str, list[Path]] = {}
    crema = Path(args.crema_dir)
    if crema.is_dir() and args.max_crema > 0:  # --max-crema 0: only the looped clips (made from its first take)
        groups["crema_d_480x360"] = sorted(crema.glob("*.flv"))[: args.max_crema]
    tmp = tempfile.TemporaryDirectory()
    if args.n_synthetic:
        w, h = (int(v) for v in args.size.split("x"))
        groups[f"synthetic_{w}x{h}"] = synthetic_clips(Path(tmp.name), args.n_synthetic, args.duration, args.fps, (w, h))
    if seconds and crema.is_dir():
        for path in looped_clips(Path(tmp.name), sorted(crema.glob("*.flv"))[0], seconds, heights):
            groups[path.stem] = [path]

    if not groups:
        raise SystemExit(f"no clips to measure: no CREMA-D sample under {crema} and --n-synthetic 0")
    base = FeatureConfig()
    configs = {"full": base, **{mode: replace(base, face=replace(base.face, search=mode)) for mode in ("near", "track")}}
    if args.every3:
        configs["every3"] = replace(base, face=replace(base.face, detect_every=3))
    if args.min_face:
        # Same full-rate detection with a coarser MTCNN pyramid: the cheapest lever on CPU.
        configs[f"min{args.min_face}"] = replace(base, face=replace(base.face, min_face_size=args.min_face))
    if args.separate:
        configs["track_separate"] = configs["track"]
    if args.modes:
        wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = sorted(set(wanted) - set(configs))
        if unknown:
            raise ValueError(f"--modes: unknown mode(s) {unknown}; available with these options: {sorted(configs)}")
        configs = {name: cfg for name, cfg in configs.items() if name in wanted}
    detectors = {name: TimedDetector(cfg.face) for name, cfg in configs.items()}
    # Warm-up outside the clock: librosa/scipy imports, MTCNN first call.
    # A CREMA-D take when there is one: with --max-crema 0 the first group may be a 120-s clip.
    first = sorted(crema.glob("*.flv"))[0] if crema.is_dir() else next(iter(groups.values()))[0]
    for name, cfg in configs.items():
        extract.COMBINED_DECODE = name != "track_separate"
        extract_clip(ClipRecord("warm", "b", "s", "x", str(first), str(first)), cfg, detectors[name])

    results: dict[str, dict] = {}
    report = {
        "command": " ".join(sys.argv),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": "",
        "face_config": FaceConfig().__dict__,
        "modes": list(configs),
        "groups": results,
    }
    for group, paths in groups.items():
        acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        frames = 0
        for rep in range(args.repeats):
            for path in paths:
                rec = ClipRecord(path.stem, "bench", "s", "x", str(path), str(path))
                wall, cpu = measure(lambda: decode_floor(str(path)))  # noqa: B023 (called at once, inside the loop)
                acc["floor_ffprobe"]["wall"] += wall
                acc["floor_ffprobe"]["cpu"] += cpu
                info = probe(str(path))  # outside the clock
                wall, cpu = measure(lambda: decode_floor(str(path), info))  # noqa: B023 (called at once)
                acc["floor_decode"]["wall"] += wall
                acc["floor_decode"]["cpu"] += cpu
                for name, cfg in configs.items():
                    det = detectors[name]
                    det.mtcnn_cpu_s = 0.0
                    out: dict[str, object] = {}
                    extract.COMBINED_DECODE = name != "track_separate"
                    wall, cpu = measure(lambda: out.setdefault("f", extract_clip(rec, cfg, det)))  # noqa: B023 (called at once)
                    acc[name]["wall"] += wall
                    acc[name]["cpu"] += cpu
                    acc[name]["mtcnn_cpu"] += det.mtcnn_cpu_s
                    acc[name]["rss_mb_after"] = max(acc[name]["rss_mb_after"], rss_mb())
                    if name == next(iter(configs)) and rep == 0:
                        frames += len(out["f"].video_times)  # type: ignore[union-attr]
        n = len(paths) * args.repeats
        row: dict[str, float | int] = {"clips": len(paths), "repeats": args.repeats, "frames_per_clip": frames / len(paths)}
        for mode, m in acc.items():
            row[f"{mode}_clips_per_s"] = n / m["wall"]
            row[f"{mode}_cpu_s_per_clip"] = m["cpu"] / n
            if "mtcnn_cpu" in m:
                row[f"{mode}_mtcnn_cpu_s_per_clip"] = m["mtcnn_cpu"] / n
                row[f"{mode}_rss_mb_after"] = m["rss_mb_after"]
        for mode in ["floor_ffprobe", *configs]:
            for floor in FLOORS:
                row[f"{mode}_vs_{floor}_cpu"] = row[f"{mode}_cpu_s_per_clip"] / row[f"{floor}_cpu_s_per_clip"]
                row[f"{mode}_vs_{floor}_wall"] = row[f"{floor}_clips_per_s"] / row[f"{mode}_clips_per_s"]
        row["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        row["load_average"] = list(os.getloadavg())
        results[group] = row
        report["machine"] = _machine()
        if on_group is not None:
            on_group(report, group)
    tmp.cleanup()
    extract.COMBINED_DECODE = True
    report["machine"] = _machine()
    return report


def _machine() -> str:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s), peak RSS {peak:.0f} MB"


def print_header(report: dict) -> None:
    print(f"# {report['command']}\n# {report['machine']}")
    print("# x decode: against floor_decode (audio + RGB frames); x +ffprobe: against floor_ffprobe (the same plus ffprobe)")
    head = f"{'clips':<22}{'mode':<16}{'clips/s':>9}{'CPU s/clip':>12}{'MTCNN CPU s':>13}"
    head += f"{'x decode CPU':>14}{'x decode wall':>15}{'x +ffprobe CPU':>16}{'x +ffprobe wall':>17}{'RSS MB after':>14}"
    print(head)


def print_group(report: dict, group: str) -> None:
    row = report["groups"][group]
    for mode in [*FLOORS, *report["modes"]]:
        mt = row.get(f"{mode}_mtcnn_cpu_s_per_clip")
        ratios = "".join(
            f"{row.get(f'{mode}_vs_{floor}_{kind}', 1.0):>{width}.2f}"
            for floor in FLOORS
            for kind, width in (("cpu", 14 if floor == "floor_decode" else 16), ("wall", 15 if floor == "floor_decode" else 17))
        )
        print(
            f"{group if mode == FLOORS[0] else '':<22}{mode:<16}{row[f'{mode}_clips_per_s']:>9.2f}"
            f"{row[f'{mode}_cpu_s_per_clip']:>12.3f}{'' if mt is None else f'{mt:.3f}':>13}"
            f"{ratios}{row.get(f'{mode}_rss_mb_after', 0):>14.0f}"
        )
    print(f"{'':<22}({row['clips']} clips x {row['repeats']}, {row['frames_per_clip']:.0f} frames/clip)", flush=True)


def print_table(report: dict) -> None:
    print_header(report)
    for group in report["groups"]:
        print_group(report, group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crema-dir", default=str(REPO.parent / "shared" / "data" / "crema_d_sample" / "VideoFlash"))
    parser.add_argument("--max-crema", type=int, default=6)
    parser.add_argument("--n-synthetic", type=int, default=0, help="synthetic talking-face clips (features/synthetic.py)")
    parser.add_argument("--loop-seconds", default="5,30", help="lengths of the 1080p clips looped from a CREMA-D take ('' for none)")
    parser.add_argument("--heights", default="1080", help="heights of the looped 16:9 clips, e.g. 1080,720 (each length at each)")
    parser.add_argument("--modes", default="", help="only these extraction modes, e.g. full,track_separate (floors always run)")
    parser.add_argument("--every3", action="store_true", help="also detect_every=3")
    parser.add_argument("--duration", type=float, default=2.5)
    parser.add_argument("--fps", default="30")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--min-face", type=int, default=0, help="extra full-rate mode with this MTCNN min_face_size (0: off)")
    parser.add_argument(
        "--separate", action="store_true", help="also track with audio and video decoded by two ffmpeg processes (as before)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    def on_group(report: dict, group: str) -> None:
        if len(report["groups"]) == 1:
            print_header(report)
        print_group(report, group)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))

    report = run(args, on_group)
    print(f"# finished; {report['machine']}")


if __name__ == "__main__":
    main()
