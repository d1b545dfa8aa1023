"""Preprocessing throughput: ffmpeg decode floor vs full feature extraction, side by side.

For every clip (the CREMA-D sample when present, plus synthetic 1280x720 talking-face
clips made in a temp dir) the modes run back to back, so they see the same machine load:

  floor     probe + decode_audio + every full-resolution RGB frame (nothing else)
  full      extract_clip with detect_every=1 (MTCNN on every frame)
  every3    extract_clip with detect_every=3 (interpolation between detections)
  min60     extract_clip with detect_every=1 and MTCNN min_face_size=60 (--min-face)

CPU seconds include ffmpeg children (resource.getrusage(RUSAGE_CHILDREN)); the ratios
compare CPU seconds per clip, which are robust to other load on the machine.

    .venv/bin/python bench/bench_preprocess.py --json bench/results/preprocess.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
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

from features.config import FaceConfig, FeatureConfig  # noqa: E402
from features.decode import decode_audio, iter_video_frames, probe  # noqa: E402
from features.extract import extract_clip  # noqa: E402
from features.faces import Detections, FaceDetector  # noqa: E402
from features.manifest import ClipRecord  # noqa: E402
from features.synthetic import make_talking_face_clip, speaker_style  # noqa: E402


class TimedDetector(FaceDetector):
    """FaceDetector that also adds up the CPU time spent inside MTCNN."""

    mtcnn_cpu_s: float = 0.0

    def detect(self, frames: np.ndarray) -> Detections:
        start = time.process_time()
        try:
            return super().detect(frames)
        finally:
            self.mtcnn_cpu_s += time.process_time() - start


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def decode_floor(path: str) -> int:
    info = probe(path)
    if info.has_audio:
        decode_audio(path, info=info)
    return sum(len(frames) for frames, _ in iter_video_frames(path, info=info))


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - wall, _cpu() - cpu


def synthetic_clips(root: Path, n: int, duration: float, fps: str, size: tuple[int, int]) -> list[Path]:
    paths = []
    for i in range(n):
        label = ("neutral", "happy", "sad", "angry")[i % 4]
        clip = make_talking_face_clip(
            root / f"syn{i}.mp4", duration, fps, size[0], size[1], label=label, speaker=speaker_style(i), seed=i
        )
        paths.append(clip.path)
    return paths


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.torch_threads)
    groups: dict[str, list[Path]] = {}
    crema = Path(args.crema_dir)
    if crema.is_dir():
        groups["crema_d_480x360"] = sorted(crema.glob("*.flv"))[: args.max_crema]
    tmp = tempfile.TemporaryDirectory()
    w, h = (int(v) for v in args.size.split("x"))
    groups[f"synthetic_{w}x{h}"] = synthetic_clips(Path(tmp.name), args.n_synthetic, args.duration, args.fps, (w, h))

    base = FeatureConfig()
    configs = {"full": base, "every3": replace(base, face=replace(base.face, detect_every=3))}
    if args.min_face:
        # Same full-rate detection with a coarser MTCNN pyramid: the cheapest lever on CPU.
        configs[f"min{args.min_face}"] = replace(base, face=replace(base.face, min_face_size=args.min_face))
    detectors = {name: TimedDetector(cfg.face) for name, cfg in configs.items()}
    # Warm-up outside the clock: librosa/scipy imports, MTCNN first call.
    first = next(iter(groups.values()))[0]
    extract_clip(ClipRecord("warm", "b", "s", "x", str(first), str(first)), base, detectors["full"])

    results: dict[str, dict] = {}
    for group, paths in groups.items():
        acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        frames = 0
        for rep in range(args.repeats):
            for path in paths:
                rec = ClipRecord(path.stem, "bench", "s", "x", str(path), str(path))
                wall, cpu = measure(lambda: decode_floor(str(path)))
                acc["floor"]["wall"] += wall
                acc["floor"]["cpu"] += cpu
                for name, cfg in configs.items():
                    det = detectors[name]
                    det.mtcnn_cpu_s = 0.0
                    out: dict[str, object] = {}
                    wall, cpu = measure(lambda: out.setdefault("f", extract_clip(rec, cfg, det)))
                    acc[name]["wall"] += wall
                    acc[name]["cpu"] += cpu
                    acc[name]["mtcnn_cpu"] += det.mtcnn_cpu_s
                    if name == "full" and rep == 0:
                        frames += len(out["f"].video_times)  # type: ignore[union-attr]
        n = len(paths) * args.repeats
        row: dict[str, float | int] = {"clips": len(paths), "repeats": args.repeats, "frames_per_clip": frames / len(paths)}
        for mode, m in acc.items():
            row[f"{mode}_clips_per_s"] = n / m["wall"]
            row[f"{mode}_cpu_s_per_clip"] = m["cpu"] / n
            if "mtcnn_cpu" in m:
                row[f"{mode}_mtcnn_cpu_s_per_clip"] = m["mtcnn_cpu"] / n
        for mode in configs:
            row[f"{mode}_vs_floor_cpu"] = row[f"{mode}_cpu_s_per_clip"] / row["floor_cpu_s_per_clip"]
            row[f"{mode}_vs_floor_wall"] = row["floor_clips_per_s"] / row[f"{mode}_clips_per_s"]
        results[group] = row
    tmp.cleanup()
    return {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "face_config": FaceConfig().__dict__,
        "modes": list(configs),
        "groups": results,
    }


def print_table(report: dict) -> None:
    print(f"# {report['command']}\n# {report['machine']}")
    head = f"{'clips':<22}{'mode':<8}{'clips/s':>9}{'CPU s/clip':>12}{'MTCNN CPU s':>13}{'x floor CPU':>13}{'x floor wall':>14}"
    print(head)
    for group, row in report["groups"].items():
        for mode in ["floor", *report["modes"]]:
            mt = row.get(f"{mode}_mtcnn_cpu_s_per_clip")
            ratio_c = row.get(f"{mode}_vs_floor_cpu", 1.0)
            ratio_w = row.get(f"{mode}_vs_floor_wall", 1.0)
            print(
                f"{group if mode == 'floor' else '':<22}{mode:<8}{row[f'{mode}_clips_per_s']:>9.2f}"
                f"{row[f'{mode}_cpu_s_per_clip']:>12.3f}{'' if mt is None else f'{mt:.3f}':>13}"
                f"{ratio_c:>13.2f}{ratio_w:>14.2f}"
            )
        print(f"{'':<22}({row['clips']} clips x {row['repeats']}, {row['frames_per_clip']:.0f} frames/clip)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crema-dir", default=str(REPO.parent / "shared" / "data" / "crema_d_sample" / "VideoFlash"))
    parser.add_argument("--max-crema", type=int, default=6)
    parser.add_argument("--n-synthetic", type=int, default=3)
    parser.add_argument("--duration", type=float, default=2.5)
    parser.add_argument("--fps", default="30")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--min-face", type=int, default=60, help="extra full-rate mode with this MTCNN min_face_size (0: off)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    report = run(args)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
