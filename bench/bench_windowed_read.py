"""A training example of a long clip: the whole clip read and cropped, against only the crop's frames read.

Writes one synthetic audio-visual clip of ``--minutes`` (default 10) through FeatureStore.write with the default
feature config (50 fps log-mel x 80, 30 fps 96x96 RGB face crops that compress like real ones: bench_data_reader's
synthetic_clip, looped), then times ``--reads`` training examples (4 s crops, augmentation on, no clip cache) of it
read two ways, alternating so both see the same machine load:

- ``whole``: ClipDataset without durations, what every clip got before session 17 when the clip cache did not hold it
  (the whole clip read, then cropped);
- ``windowed``: ClipDataset with the manifest's durations: a clip over WINDOWED_READ_RATIO crops long reads the
  crop's frames only (``FeatureStore.read(window=...)``).

Per way: median and max seconds per example, and the peak of Python-traced memory during one example (tracemalloc,
which sees numpy's buffers and zarr's decompression). The examples are checked equal, key by key.

    .venv/bin/python bench/bench_windowed_read.py --store /tmp/msata-long-store --minutes 10 --reads 6 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data_reader import FPS_AUDIO, FPS_VIDEO, synthetic_clip  # noqa: E402

CLIP_ID = "spk000_long"


def long_clip(minutes: float):
    """A clip of ``minutes`` built from 3 s synthetic takes laid end to end (times continuous)."""
    from features.clip import ClipFeatures

    takes, seconds, k = [], 0.0, 0
    while seconds < minutes * 60.0:
        take = synthetic_clip(f"take{k}", k % 6, np.random.default_rng(k))
        takes.append((seconds, take))
        seconds += take.duration_s
        k += 1
    tv = [len(t.video_times) for _, t in takes]
    ta = [len(t.audio_times) for _, t in takes]
    video_times = np.arange(sum(tv)) / FPS_VIDEO
    audio_times = (np.arange(sum(ta)) + 0.5) / FPS_AUDIO
    cat = lambda name: np.concatenate([getattr(t, name) for _, t in takes])  # noqa: E731
    return ClipFeatures(
        clip_id=CLIP_ID,
        duration_s=float(max(video_times[-1] + 1 / FPS_VIDEO, audio_times[-1] + 0.5 / FPS_AUDIO)),
        logmel=cat("logmel"),
        audio_times=audio_times,
        face_crops=cat("face_crops"),
        video_times=video_times,
        face_mask=cat("face_mask"),
        face_boxes=cat("face_boxes"),
        face_landmarks=cat("face_landmarks"),
        face_probs=cat("face_probs"),
    )


def write_store(path: str, minutes: float) -> float:
    from features.config import FeatureConfig
    from features.manifest import ClipRecord
    from storage.feature_store import FeatureStore

    store = FeatureStore.create(path, FeatureConfig())
    if not store.has(CLIP_ID):
        record = ClipRecord(
            clip_id=CLIP_ID,
            dataset="folder",
            speaker="spk000",
            label="happy",
            audio_path="/synthetic/long.mp4",
            video_path="/synthetic/long.mp4",
        )
        store.write(record, long_clip(minutes))
    return float(store.manifest().set_index("clip_id").loc[CLIP_ID, "duration_s"])


def timed_example(dataset, key) -> tuple[float, float, object]:
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    example = dataset[key]
    seconds = time.perf_counter() - started
    return seconds, (tracemalloc.get_traced_memory()[1] - base) / 2**20, example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--reads", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    from features.config import FeatureConfig
    from modeling.data.dataset import ClipDataset
    from modeling.data.examples import DataConfig

    started = time.perf_counter()
    duration = write_store(args.store, args.minutes)
    print(f"store {args.store}: one clip of {duration:.1f} s ({time.perf_counter() - started:.1f} s to write or find)", flush=True)
    config = DataConfig(max_duration_s=4.0, in_memory=False)
    ways = {
        "whole": ClipDataset(args.store, [CLIP_ID], [0], FeatureConfig(), config, True),
        "windowed": ClipDataset(args.store, [CLIP_ID], [0], FeatureConfig(), config, True, durations=[duration]),
    }
    tracemalloc.start()
    figures: dict[str, dict[str, list[float]]] = {way: {"seconds": [], "peak_mib": []} for way in ways}
    for epoch in range(args.reads):
        examples = {}
        for way, dataset in ways.items():
            seconds, peak, examples[way] = timed_example(dataset, (0, epoch))
            figures[way]["seconds"].append(seconds)
            figures[way]["peak_mib"].append(peak)
        for name in ("audio", "audio_times", "video", "video_times", "face_mask"):
            if not torch.equal(getattr(examples["whole"], name), getattr(examples["windowed"], name)):
                raise SystemExit(f"epoch {epoch}: the two ways give different {name}")
        print(
            f"epoch {epoch}: " + ", ".join(f"{w} {f['seconds'][-1]:.3f} s / {f['peak_mib'][-1]:.0f} MiB" for w, f in figures.items()),
            flush=True,
        )
    summary = {
        way: {
            "median_s": statistics.median(f["seconds"]),
            "max_s": max(f["seconds"]),
            "median_peak_mib": statistics.median(f["peak_mib"]),
            "max_peak_mib": max(f["peak_mib"]),
        }
        for way, f in figures.items()
    }
    ratio = summary["whole"]["median_s"] / summary["windowed"]["median_s"]
    print("| read | median s / example | max s | median peak MiB | max peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for way, s in summary.items():
        print(f"| {way} | {s['median_s']:.3f} | {s['max_s']:.3f} | {s['median_peak_mib']:.0f} | {s['max_peak_mib']:.0f} |")
    print(f"whole / windowed, median time per example: {ratio:.1f}x (same run, alternating)")
    if args.out:
        result = {"clip_s": duration, "reads": args.reads, "figures": figures, "summary": summary, "ratio_median_s": ratio}
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
