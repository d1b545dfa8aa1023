"""Preprocessing cost per clip by audio representation, measured side by side in one process.

For the same clips, ``extract_clip`` runs with each audio encoder in turn (interleaved per clip,
so machine load hits every variant alike); reported: CPU-seconds per clip including ffmpeg/ffprobe
children, wall seconds per clip, and audio-seconds per CPU-second. The encoder's first call
(weights read, sha256 checked, tensors parsed) is timed apart as its load cost.

    .venv/bin/python bench/bench_audio_encoders.py --root ../shared/data/ravdess_speech_16k --clips 40 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.audio_encoders.stage import load_packaged_encoder  # noqa: E402
from features.config import AudioEncoderConfig, FeatureConfig  # noqa: E402
from features.extract import extract_clip  # noqa: E402
from features.recipes.ravdess import prepare_ravdess  # noqa: E402

ENCODERS = ("log-mel", "whisper-tiny.en", "whisper-base")


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="RAVDESS speech root")
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = prepare_ravdess(args.root).records
    records = [records[i] for i in np.linspace(0, len(records) - 1, args.clips).astype(int)]  # spread over actors
    configs = {name: FeatureConfig(audio_encoder=AudioEncoderConfig(name=name)) for name in ENCODERS}
    load_s = {}
    for name in ENCODERS[1:]:
        start = time.perf_counter()
        load_packaged_encoder(name, "cpu")
        load_s[name] = round(time.perf_counter() - start, 2)
    for name in ENCODERS:  # warm-up, not timed: librosa's numba JIT, first ffmpeg start, page cache
        extract_clip(records[0], configs[name])
    cpu = {name: 0.0 for name in ENCODERS}
    wall = {name: 0.0 for name in ENCODERS}
    audio_s = 0.0
    for i, record in enumerate(records):
        for name in ENCODERS[i % 3 :] + ENCODERS[: i % 3]:  # rotate the order: no variant always reads the file first
            c0, w0 = cpu_seconds(), time.perf_counter()
            features = extract_clip(record, configs[name])
            cpu[name] += cpu_seconds() - c0
            wall[name] += time.perf_counter() - w0
        audio_s += features.duration_s
    n = len(records)
    result = {
        "clips": n,
        "threads": args.threads,
        "mean_clip_s": round(audio_s / n, 2),
        "encoder_load_s": load_s,
        "cpu_s_per_clip": {k: round(v / n, 3) for k, v in cpu.items()},
        "wall_s_per_clip": {k: round(v / n, 3) for k, v in wall.items()},
        "cpu_ratio_to_log_mel": {k: round(v / cpu["log-mel"], 2) for k, v in cpu.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
