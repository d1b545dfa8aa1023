"""Preprocessing throughput: ffmpeg decode floor vs full feature extraction, side by side.

For every clip (the CREMA-D sample when present; 1080p clips of --loop-seconds made by
looping a CREMA-D take, scaled, so that the face is real; else synthetic talking faces)
the modes run back to back, so they see the same machine load:

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


def looped_clips(root: Path, source: Path, seconds: list[float]) -> list[Path]:
    """1920x1080 H.264 + AAC clips of the given lengths, a CREMA-D take looped (real face, real speech)."""
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
    for sec in seconds:
        path = root / f"loop1080_{sec:g}s.mp4"
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
                "scale=1920:1080",
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


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.torch_threads)
    groups: dict[str, list[Path]] = {}
    crema = Path(args.crema_dir)
    if crema.is_dir():
        groups["crema_d_480x360"] = sorted(crema.glob("*.flv"))[: args.max_crema]
    tmp = tempfile.TemporaryDirectory()
    if args.n_synthetic:
        w, h = (int(v) for v in args.size.split("x"))
        groups[f"synthetic_{w}x{h}"] = synthetic_clips(Path(tmp.name), args.n_synthetic, args.duration, args.fps, (w, h))
    if args.loop_seconds and crema.is_dir():
        for path in looped_clips(Path(tmp.name), sorted(crema.glob("*.flv"))[0], [float(v) for v in args.loop_seconds.split(",")]):
            groups[path.stem] = [path]

    base = FeatureConfig()
    configs = {"full": base, **{mode: replace(base, face=replace(base.face, search=mode)) for mode in ("near", "track")}}
    if args.every3:
        configs["every3"] = replace(base, face=replace(base.face, detect_every=3))
    if args.min_face:
        # Same full-rate detection with a coarser MTCNN pyramid: the cheapest lever on CPU.
        configs[f"min{args.min_face}"] = replace(base, face=replace(base.face, min_face_size=args.min_face))
    if args.separate:
        configs["track_separate"] = configs["track"]
    detectors = {name: TimedDetector(cfg.face) for name, cfg in configs.items()}
    # Warm-up outside the clock: librosa/scipy imports, MTCNN first call.
    first = next(iter(groups.values()))[0]
    for name, cfg in configs.items():
        extract.COMBINED_DECODE = name != "track_separate"
        extract_clip(ClipRecord("warm", "b", "s", "x", str(first), str(first)), cfg, detectors[name])

    results: dict[str, dict] = {}
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
                    if name == "full" and rep == 0:
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
        results[group] = row
    tmp.cleanup()
    extract.COMBINED_DECODE = True
    return {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB",
        "face_config": FaceConfig().__dict__,
        "modes": list(configs),
        "groups": results,
    }


def print_table(report: dict) -> None:
    print(f"# {report['command']}\n# {report['machine']}")
    print("# x decode: against floor_decode (audio + RGB frames); x +ffprobe: against floor_ffprobe (the same plus ffprobe)")
    head = f"{'clips':<22}{'mode':<16}{'clips/s':>9}{'CPU s/clip':>12}{'MTCNN CPU s':>13}"
    head += f"{'x decode CPU':>14}{'x decode wall':>15}{'x +ffprobe CPU':>16}{'x +ffprobe wall':>17}{'RSS MB after':>14}"
    print(head)
    for group, row in report["groups"].items():
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
        print(f"{'':<22}({row['clips']} clips x {row['repeats']}, {row['frames_per_clip']:.0f} frames/clip)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crema-dir", default=str(REPO.parent / "shared" / "data" / "crema_d_sample" / "VideoFlash"))
    parser.add_argument("--max-crema", type=int, default=6)
    parser.add_argument("--n-synthetic", type=int, default=0, help="synthetic talking-face clips (features/synthetic.py)")
    parser.add_argument("--loop-seconds", default="5,30", help="lengths of the 1080p clips looped from a CREMA-D take ('' for none)")
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
    report = run(args)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
