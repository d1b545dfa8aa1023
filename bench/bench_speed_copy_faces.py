"""A speed copy of an audio-visual clip: its faces detected again, against taken from its stored recording.

For each CREMA-D sample clip (``../shared/data/crema_d_sample/VideoFlash``, 480x360 VP6 at 29.97 fps, MP3 audio), the
recording is extracted once (default feature config: log-mel, MTCNN crops; one torch thread, as preprocessing runs);
then each copy (``--factors``, default 0.9 and 1.1) is extracted both ways, alternating so both see the same load:

- ``detected``: ``extract_clip(copy, detector)``, what every copy did before session 17 (decode the video, run MTCNN);
- ``handed``: ``extract_clip(copy, source_faces=recording)``, what ``flows.preprocess.process_clip`` now does when the
  recording is stored (``recording_faces``): the audio is decoded and resampled, the faces are the recording's.

The two ways' arrays are checked equal, bit for bit. Printed: median wall and CPU seconds per copy each way, the
recording's own, and what a ``--speed-perturb 0.9,1.1`` run costs per recording before and after (recording + 2 copies).

    .venv/bin/python bench/bench_speed_copy_faces.py [--data ../shared/data] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARRAYS = ("logmel", "audio_times", "face_crops", "video_times", "face_mask", "face_boxes", "face_landmarks", "face_probs")


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.9, 1.1])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from features.config import FeatureConfig
    from features.extract import extract_clip
    from features.faces import FaceDetector
    from features.manifest import ClipRecord
    from features.speed import speed_copy

    flvs = sorted((args.data / "crema_d_sample" / "VideoFlash").glob("*.flv"))
    if not flvs:
        raise SystemExit(f"no CREMA-D sample clips under {args.data}/crema_d_sample/VideoFlash")
    config = FeatureConfig()
    detector = FaceDetector(config.face)
    rows = []
    for flv in flvs:
        record = ClipRecord(clip_id=flv.stem, dataset="crema-d", speaker="1001", label="x", audio_path=str(flv), video_path=str(flv))
        recording, rec_wall, rec_cpu = timed(lambda r=record: extract_clip(r, config, detector))
        for factor in args.factors:
            copy = speed_copy(record, factor)
            detected, det_wall, det_cpu = timed(lambda c=copy: extract_clip(c, config, detector))
            handed, hand_wall, hand_cpu = timed(lambda c=copy, r=recording: extract_clip(c, config, source_faces=r))
            for name in ARRAYS:
                if not np.array_equal(getattr(detected, name), getattr(handed, name)):
                    raise SystemExit(f"{copy.clip_id}: the two ways give different {name}")
            if detected.duration_s != handed.duration_s:
                raise SystemExit(f"{copy.clip_id}: the two ways give different durations")
            rows.append(
                {"copy": copy.clip_id, "recording_s": rec_wall, "recording_cpu_s": rec_cpu, "detected_s": det_wall}
                | {"detected_cpu_s": det_cpu, "handed_s": hand_wall, "handed_cpu_s": hand_cpu, "frames": len(recording.video_times)}
            )
            print(f"{copy.clip_id}: recording {rec_wall:.2f} s, copy detected {det_wall:.2f} s, handed {hand_wall:.3f} s", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "copy"}
    n = len(args.factors)
    before, after = med["recording_s"] + n * med["detected_s"], med["recording_s"] + n * med["handed_s"]
    print("| per clip (median over copies) | wall s | CPU s |")
    print("|---|---:|---:|")
    print(f"| the recording | {med['recording_s']:.2f} | {med['recording_cpu_s']:.2f} |")
    print(f"| a copy, faces detected again | {med['detected_s']:.2f} | {med['detected_cpu_s']:.2f} |")
    print(f"| a copy, the recording's faces handed over | {med['handed_s']:.3f} | {med['handed_cpu_s']:.3f} |")
    print(f"copy: detected / handed {med['detected_s'] / med['handed_s']:.1f}x; a recording + {n} copies: {before:.2f} s -> {after:.2f} s")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "median": med, "recording_plus_copies_s": [before, after]}, indent=2))


if __name__ == "__main__":
    main()
