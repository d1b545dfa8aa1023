"""The training data path at CREMA-D scale: reader clips/s, peak memory, and the data-wait share.

1. ``generate``: a synthetic feature store written through FeatureStore.write (real Zarr):
   ``--clips`` clips (default 7,500, CREMA-D's size) of 2.2-3.2 s, 30 fps face crops
   96x96x3 uint8 (~75 frames) and 50 fps log-mel x 80 (~125 frames). Crops are a smooth
   face-like image moved a little every frame plus sensor noise (sigma 4 grey levels), so
   they compress like real crops do (about 2x with blosc-zstd) rather than like pure noise
   (1x) or flat colour (100x). ``--jobs`` writer processes.
2. ``read``: ClipDataset + make_loader exactly as training builds them (random order,
   random crops, augmentation, bounded cache), ``--workers`` DataLoader processes; clips/s
   over one pass and the peak resident memory of the main process plus its workers
   (sampled every 0.2 s, psutil).
3. ``train``: one epoch of modeling.training.train_loop.train_model on ``--train-clips`` clips with
   the default model on ``--device``; prints the loop's own ``data_wait_share``
   (the share of the training pass spent waiting for the next batch) and clips/s.

    .venv/bin/python bench/bench_data_reader.py --store /tmp/crema-scale --clips 7500 --jobs 2 generate
    .venv/bin/python bench/bench_data_reader.py --store /tmp/crema-scale read --workers 2 --reads 2000
    .venv/bin/python bench/bench_data_reader.py --store /tmp/crema-scale train --device cuda --workers 6 --train-clips 3000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = ["angry", "disgust", "fearful", "happy", "neutral", "sad"]
FPS_VIDEO, FPS_AUDIO = 30.0, 50.0


def synthetic_clip(clip_id: str, label: int, rng: np.random.Generator, size: int = 96, n_mels: int = 80):
    from features.clip import ClipFeatures

    duration = float(rng.uniform(2.2, 3.2))
    tv, ta = int(duration * FPS_VIDEO), int(duration * FPS_AUDIO)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([120 + 60 * np.sin(3 * xx + label), 100 + 50 * np.cos(4 * yy), 90 + 40 * xx * yy], axis=-1)  # (S, S, 3)
    shifts = np.cumsum(rng.integers(-1, 2, size=(tv, 2)), axis=0)  # a slow random walk: the face moves a little
    frames = np.stack([np.roll(base, tuple(s), axis=(0, 1)) for s in shifts])  # (Tv, S, S, 3)
    crops = np.clip(frames + rng.normal(0, 4.0, frames.shape), 0, 255).astype(np.uint8)
    logmel = (rng.normal(-4.0, 1.5, size=(ta, n_mels)) + np.linspace(0, -3, n_mels)).astype(np.float32)  # (Ta, F)
    return ClipFeatures(
        clip_id=clip_id,
        duration_s=duration,
        logmel=logmel,
        audio_times=(np.arange(ta) + 0.5) / FPS_AUDIO,
        face_crops=crops,
        video_times=np.arange(tv) / FPS_VIDEO,
        face_mask=np.ones(tv, dtype=bool),
        face_boxes=np.tile(np.array([10.0, 10.0, 90.0, 90.0], np.float32), (tv, 1)),
        face_landmarks=np.zeros((tv, 5, 2), np.float32),
        face_probs=np.full(tv, 0.99, np.float32),
    )


def _write_range(store_path: str, start: int, stop: int) -> int:
    from features.config import FeatureConfig
    from features.manifest import ClipRecord
    from storage.feature_store import FeatureStore

    store = FeatureStore.create(store_path, FeatureConfig())
    written = 0
    for i in range(start, stop):
        speaker, label = f"spk{i % 91:03d}", i % len(LABELS)
        clip_id = f"{speaker}_{i:05d}"
        if store.has(clip_id):
            continue
        features = synthetic_clip(clip_id, label, np.random.default_rng(i))
        record = ClipRecord(
            clip_id=clip_id,
            dataset="crema-d",
            speaker=speaker,
            label=LABELS[label],
            audio_path=f"/synthetic/{clip_id}.wav",
            video_path=f"/synthetic/{clip_id}.flv",
        )
        written += store.write(record, features)
    return written


def generate(args: argparse.Namespace) -> dict:
    from features.config import FeatureConfig
    from storage.feature_store import FeatureStore

    FeatureStore.create(args.store, FeatureConfig())  # once, before the writers race on the root metadata
    started = time.perf_counter()
    bounds = np.linspace(0, args.clips, args.jobs + 1).astype(int)
    with ProcessPoolExecutor(args.jobs) as pool:
        written = sum(pool.map(_write_range, [args.store] * args.jobs, bounds[:-1], bounds[1:]))
    FeatureStore.create(args.store, FeatureConfig()).compact()
    seconds = time.perf_counter() - started
    disk = sum(f.stat().st_size for f in Path(args.store).rglob("*") if f.is_file())
    return {"clips": args.clips, "written": int(written), "seconds": round(seconds, 1), "disk_gb": round(disk / 1e9, 2)}


class PeakRSS:
    """Peak resident memory of this process and its children (DataLoader workers), sampled."""

    def __init__(self, every_s: float = 0.2) -> None:
        import psutil

        self.proc, self.every_s, self.peak, self._stop = psutil.Process(), every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = self.proc.memory_info().rss
            for child in self.proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak = max(self.peak, total)
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _dataset(store_path: str, n: int, cache_bytes: int, train: bool = True):
    from modeling.data.dataset import ClipDataset
    from modeling.data.examples import DataConfig
    from storage.feature_store import FeatureStore

    store = FeatureStore.open(store_path)
    m = store.manifest().iloc[:n]
    labels = [LABELS.index(v) for v in m["label"]]
    return ClipDataset(store_path, m["clip_id"].tolist(), labels, store.config, DataConfig(cache_bytes=cache_bytes), train)


def read(args: argparse.Namespace) -> dict:
    from modeling.data.dataset import make_loader

    ds = _dataset(args.store, args.reads, args.cache_bytes)
    loader = make_loader(ds, args.batch_size, args.workers, seed=0)
    with PeakRSS() as rss:
        started = time.perf_counter()
        clips = sum(len(batch) for batch in loader)
        seconds = time.perf_counter() - started
    return {
        "clips": clips,
        "workers": args.workers,
        "clips_per_s": round(clips / seconds, 1),
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(rss.peak / 1e9, 2),
        "cache_bytes": args.cache_bytes,
    }


def train(args: argparse.Namespace) -> dict:
    import tempfile

    import torch

    from modeling.data.dataset import make_loader
    from modeling.network.encoder import MsataConfig, MsataModel
    from modeling.training.train_loop import TrainConfig, train_model
    from storage.feature_store import FeatureStore

    store = FeatureStore.open(args.store)
    feature_config = store.config
    from modeling.training.experiment_spec import build_model_config

    model_config = build_model_config({}, feature_config, len(LABELS))
    config = TrainConfig(epochs=1, batch_size=args.batch_size, num_workers=args.workers, device=args.device, cache_bytes=args.cache_bytes)
    train_ds = _dataset(args.store, args.train_clips, args.cache_bytes)
    val_ds = _dataset(args.store, 64, args.cache_bytes, train=False)
    loaders = [make_loader(d, args.batch_size, args.workers, 0, pin_memory=args.device == "cuda") for d in (train_ds, val_ds)]
    torch.manual_seed(0)
    model = MsataModel(MsataConfig.from_dict(model_config))
    meta = {"model_config": model_config, "feature_config": feature_config.to_dict(), "label_names": LABELS}
    with PeakRSS() as rss, tempfile.TemporaryDirectory() as out:
        result = train_model(model, loaders[0], loaders[1], config, out, meta)
    record = result.history[-1]
    return {
        "device": args.device,
        "workers": args.workers,
        "clips": args.train_clips,
        "batch_size": args.batch_size,
        "train_clips_per_s": round(record.train_clips_per_s, 1),
        "data_wait_share": round(record.data_wait_share, 4),
        "epoch_s": round(record.seconds, 1),
        "peak_rss_gb": round(rss.peak / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--clips", type=int, default=7500, help="generate: clips to write")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="generate: writer processes")
    parser.add_argument("--reads", type=int, default=2000, help="read: clips to read")
    parser.add_argument("--train-clips", type=int, default=2000, help="train: clips in the epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-bytes", type=int, default=1 << 30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("steps", nargs="+", choices=["generate", "read", "train"])
    args = parser.parse_args()
    for step in args.steps:
        print(json.dumps({"step": step} | {"generate": generate, "read": read, "train": train}[step](args)), flush=True)


if __name__ == "__main__":
    main()
