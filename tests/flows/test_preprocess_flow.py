"""The preprocess-dataset flow end to end: real ffmpeg, MTCNN, Zarr and Prefect."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from features.config import AudioConfig, FeatureConfig
from features.synthetic import make_synthetic_dataset, make_talking_face_clip
from flows.preprocess import run_preprocessing
from storage import ConfigMismatchError, FeatureStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four good talking-face clips plus one of each kind of bad input, in one labels.csv."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("raw"), n_speakers=2, clips_per_class=1, classes=("happy", "sad"), duration_s=1.0, size=(160, 120)
    )
    (root / "clips" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (root / "clips" / "empty.mp4").write_bytes(b"")
    make_talking_face_clip(root / "clips" / "silent.mp4", duration_s=1.0, width=160, height=120, with_audio=False, seed=7)
    make_talking_face_clip(root / "clips" / "noface.mp4", duration_s=1.0, width=160, height=120, blank_frames=range(25), seed=8)
    with open(root / "labels.csv", "a", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["clips/corrupt.mp4", "happy", "spk09"])
        writer.writerow(["clips/empty.mp4", "sad", "spk09"])
        writer.writerow(["clips/silent.mp4", "sad", "spk09"])
        writer.writerow(["clips/noface.mp4", "happy", "spk09"])
        writer.writerow(["clips/missing.mp4", "happy", "spk09"])
    return root


def test_flow_builds_store_records_failures_and_resumes(folder_dataset: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    seen: list[tuple[int, int]] = []
    summary = run_preprocessing("folder", folder_dataset, store_path, on_progress=lambda stored, total: seen.append((stored, total)))

    # 4 good clips + silent (video-only) + noface (kept audio-only) are stored; corrupt one fails in
    # extraction; the empty and the missing file are rejected by the recipe or fail extraction.
    assert summary.done == 6, summary.failures
    assert summary.failed + summary.rejected == 3
    reasons = " ".join(f["reason"] for f in summary.failures)
    assert "corrupt.mp4" in reasons and "missing.mp4" in reasons and "empty.mp4" in reasons
    # Progress is polled from the store in this process: clips stored out of the clips of this run.
    assert seen[-1] == (summary.done, summary.done + summary.failed)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)

    store = FeatureStore.open(store_path)
    manifest = store.manifest().set_index("clip_id")
    assert len(manifest) == 6
    silent = manifest.loc[[c for c in manifest.index if "silent" in c][0]]
    assert bool(silent.has_video) and not bool(silent.has_audio)
    noface = manifest.loc[[c for c in manifest.index if "noface" in c][0]]
    assert bool(noface.has_audio) and not bool(noface.has_video)
    assert "no face" in noface.notes
    good = manifest[manifest.index.str.contains("spk")]
    assert (good.face_ratio >= 0.95).all() and good.has_audio.all()
    clip = store.read(good.index[0])
    assert clip.logmel.shape[1] == 80 and clip.video_times[1] == pytest.approx(1 / 25)

    # The summary with its failures is a Prefect artifact of the flow run.
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        latest = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["preprocess-folder"])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    assert latest and latest[0].type == "markdown" and latest[0].flow_run_id is not None
    text = latest[0].data
    assert f"| {summary.done} | 0 | {summary.failed} | {summary.rejected} |" in text and str(store_path) in text
    assert all(f["reason"].split()[0] in text for f in summary.failures) and "corrupt.mp4" in text

    # The clip subflow gets its records as a file, not as parameters: Prefect refuses parameters over
    # 512 KiB, which ~1,700 records reach. The file is gone once the flow is done.
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["preprocess-clips"])))
    assert runs and all(set(r.parameters) == {"records_file", "store", "config", "device"} for r in runs)
    assert not any(Path(r.parameters["records_file"]).exists() for r in runs)

    # A second run finds everything done and touches nothing.
    again = run_preprocessing("folder", folder_dataset, store_path)
    assert again.done == 0 and again.skipped == 6


def test_store_refuses_another_feature_config(folder_dataset: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    run_preprocessing("folder", folder_dataset, store_path, limit=1)
    other = FeatureConfig(audio=AudioConfig(n_mels=64))
    with pytest.raises(ConfigMismatchError, match="config"):
        run_preprocessing("folder", folder_dataset, store_path, limit=1, feature_config=other)


def test_ravdess_audio_on_a_local_dask_cluster(shared_data: Path, tmp_path: Path) -> None:
    """The same tasks on two Dask worker processes (prefect-dask), on real RAVDESS audio; the
    features are those of one worker thread, bit for bit (before the BLAS thread limit in
    flows/preprocess.py, OpenBLAS's thread count moved the log-mel's last bit: 301 values of
    these 8 clips differed)."""
    summary = run_preprocessing("ravdess", shared_data / "ravdess_speech_16k", tmp_path / "store", workers=2, limit=8)
    assert summary.done == 8 and summary.failed == 0
    store = FeatureStore.open(tmp_path / "store")
    manifest = store.manifest()
    assert len(manifest) == 8 and manifest.has_audio.all() and not manifest.has_video.any()
    # RAVDESS utterances last about 3-5 s: at 50 frames/s that is 150-250 log-mel frames.
    assert manifest.n_audio_frames.between(100, 300).all()

    one = run_preprocessing("ravdess", shared_data / "ravdess_speech_16k", tmp_path / "one-worker", workers=1, limit=8)
    assert one.done == 8
    threaded = FeatureStore.open(tmp_path / "one-worker")
    for clip_id in manifest.clip_id:
        a, b = store.read(clip_id), threaded.read(clip_id)
        assert np.array_equal(a.logmel, b.logmel) and np.array_equal(a.audio_times, b.audio_times), clip_id


def test_msata_local_dask_workers_start_without_dasks_malloc_trim_threshold() -> None:
    """task_runner_for(2) unsets MALLOC_TRIM_THRESHOLD_ for the nannies it will start (~1.7 CPU-s per
    clip of system time, docs/benchmarks.md); Dask's other pre-spawn variables stay."""
    import os

    import dask
    from distributed import Client, LocalCluster

    from flows.runners import task_runner_for

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    before = dask.config.get(key, default=None)  # distributed is imported: its defaults are loaded
    try:
        task_runner_for(2)
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            env = client.submit(
                lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OPENBLAS_NUM_THREADS")}, pure=False
            ).result()
    finally:
        dask.config.set({key: before})
    assert env == {"MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"), "OPENBLAS_NUM_THREADS": "1"}, env


def test_crema_d_sample_with_faces(shared_data: Path, tmp_path: Path) -> None:
    summary = run_preprocessing("crema-d", shared_data / "crema_d_sample", tmp_path / "store", limit=2)
    assert summary.done == 2, summary.failures
    manifest = FeatureStore.open(tmp_path / "store").manifest()
    assert manifest.has_video.all() and (manifest.face_ratio > 0.9).all()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda ev: (ev[0], ev[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_flow_called_as_a_deployment_runs_a_bounded_number_of_clips(folder_dataset: Path, tmp_path: Path) -> None:
    """A deployment calls the flow itself (no run_preprocessing): its default runner must be bounded."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    from flows.preprocess import preprocess_dataset

    before = datetime.now(UTC)
    summary = preprocess_dataset("folder", str(folder_dataset), str(tmp_path / "store"))
    assert summary.done == 6
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="clip-"), start_time=TaskRunFilterStartTime(after_=before))
        )
    intervals = [(r.start_time.timestamp(), r.end_time.timestamp()) for r in runs if r.start_time and r.end_time]
    assert len(intervals) == summary.done + summary.failed, [r.name for r in runs]
    assert _max_overlap(intervals) == 1
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        preprocess_dataset("folder", str(folder_dataset), str(tmp_path / "store"), workers=0)
