"""Preprocessing cost per frame of the two face representations, side by side on the same decoded frames.

    python bench/bench_face_features.py [--clips DIR] [--threads 1]

For every clip the frames are decoded once (not timed), then MTCNN crops (features.faces.FaceDetector,
default FaceConfig) and MediaPipe blendshapes (features.face_landmarks.BlendshapeExtractor) each run on
them, in alternating order from clip to clip so both see the same load. Wall and process CPU time
(all threads, so MediaPipe's own threads count) per frame; model loading is excluded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.config import FaceConfig  # noqa: E402
from features.decode import iter_video_frames, probe  # noqa: E402
from features.face_landmarks import BlendshapeExtractor  # noqa: E402
from features.faces import FaceDetector  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/crema_d_sample/VideoFlash")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (MTCNN)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(args.clips.glob("*.flv")) or sorted(args.clips.glob("*.mp4"))
    if not files:
        raise SystemExit(f"no .flv or .mp4 under {args.clips}")
    mtcnn, blend = FaceDetector(FaceConfig()), BlendshapeExtractor()
    runs = {"mtcnn crops": (lambda ch: mtcnn.track(ch)), "blendshapes": (lambda ch: blend.track(ch))}
    cost: dict[str, list[tuple[float, float, int, float]]] = {k: [] for k in runs}
    for i, path in enumerate(files):
        chunks = list(iter_video_frames(str(path), chunk=32, info=probe(str(path))))
        n = sum(len(t) for _, t in chunks)
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            track = runs[name](chunks)
            cost[name].append((time.perf_counter() - w0, time.process_time() - c0, n, float(track.mask.mean())))
        print(f"{path.name}: {n} frames, " + ", ".join(f"{k} {v[-1][0] / n * 1000:.1f} ms/frame" for k, v in cost.items()), flush=True)
    print("\n| representation | clips | frames | wall ms / frame | CPU ms / frame | face found |\n|---|---:|---:|---:|---:|---:|")
    for name, rows in cost.items():
        frames = sum(r[2] for r in rows)
        print(f"| {name} | {len(rows)} | {frames} | {sum(r[0] for r in rows) / frames * 1000:.1f} | "
              f"{sum(r[1] for r in rows) / frames * 1000:.1f} | {statistics.mean(r[3] for r in rows):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
