"""Prefect flow ``preprocess-dataset``: raw corpus -> feature store.

discover (recipe) -> one task per clip (paths and ids in, an outcome out) ->
commit (manifest compaction) -> summary of done / skipped / failed with reasons,
returned and published as a Prefect artifact (``preprocess-<dataset>``, flows/artifacts.py).
Tasks never pass arrays: each one decodes, extracts and writes its clip itself.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from features.clip import ClipError, ClipFeatures
from features.config import FeatureConfig
from features.manifest import ClipRecord, RecipeResult
from features.recipes import discover
from features.speed import check_speed_factors, plan_speed_copies, with_speed_copies
from flows.artifacts import publish_preprocess_summary
from flows.progress import ProgressCallback, store_progress
from flows.runners import task_runner_for, validate_workers
from storage import FeatureStore


@dataclass(frozen=True)
class ClipOutcome:
    clip_id: str
    status: str  # "done" | "skipped" | "failed"
    reason: str = ""
    seconds: float = 0.0


@dataclass
class PreprocessSummary:
    store: str
    config_hash: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    rejected: int = 0  # files the recipe could not name-parse (never reached extraction)
    failures: list[dict[str, str]] = field(default_factory=list)  # clip_id/path, reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=2)
def _detector(face_config_json: str, device: str):  # -> FaceDetector; cached so each worker loads MTCNN once
    from features.config import FaceConfig
    from features.faces import FaceDetector

    return FaceDetector(FaceConfig(**json.loads(face_config_json)), device=device)


def _one_torch_thread() -> None:
    """Preprocessing runs torch at one intra-op thread: MTCNN is thousands of small ops, and a
    second thread cost 3.9x the CPU end to end (measured in issue 13); parallelism
    comes from the workers (clips at once). MSATA_PREPROCESS_TORCH_THREADS overrides it.

    BLAS runs at one thread too, in every runner: Dask's workers start with
    OPENBLAS_NUM_THREADS=1 while the thread runner had OpenBLAS's default, and the log-mel's
    matrix product then differed in its last bit between --workers 1 and 2 (836 of 102,560
    values, at most 9.5e-7; docs/benchmarks.md). Features must not depend on the worker count."""
    import os

    import torch
    from threadpoolctl import threadpool_limits

    threads = int(os.environ.get("MSATA_PREPROCESS_TORCH_THREADS", "1"))
    if threads < 1:
        raise ValueError(f"MSATA_PREPROCESS_TORCH_THREADS={threads}: must be >= 1")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    threadpool_limits(limits=1, user_api="blas")  # process-wide, kept (not used as a context manager)


def process_clip(record: ClipRecord, store_path: str, config: FeatureConfig, device: str = "auto") -> ClipOutcome:
    """Extract and store one clip unless it is already stored. Plain function, no Prefect.

    ``device`` (features/devices.py) is resolved here, on the worker that runs the clip:
    the GPUs are those of that worker's host. A worker that cannot honour it raises
    ValueError, which the flow records as this clip's failure with that message.
    """
    from features.devices import worker_device
    from features.extract import extract_clip

    _one_torch_thread()
    torch_device = worker_device(device)

    start = time.perf_counter()
    store = FeatureStore.create(store_path, config)
    if store.has(record.clip_id):
        return ClipOutcome(record.clip_id, "skipped")
    faces = recording_faces(store, record, config)  # a speed copy whose recording is stored: no detection again
    uses_mtcnn = record.has_video and config.face.representation == "crops" and faces is None  # blendshapes bring their own
    detector = _detector(json.dumps(asdict(config.face), sort_keys=True), torch_device) if uses_mtcnn else None
    try:
        features = extract_clip(record, config, detector=detector, device=torch_device, spill_dir=store.spill_dir, source_faces=faces)
    except ClipError as err:
        store.record_failure(record.clip_id, record.video_path or record.audio_path or "", str(err))
        return ClipOutcome(record.clip_id, "failed", str(err), time.perf_counter() - start)
    store.write(record, features)
    return ClipOutcome(record.clip_id, "done", "; ".join(features.notes), time.perf_counter() - start)


def recording_faces(store: FeatureStore, record: ClipRecord, config: FeatureConfig) -> ClipFeatures | None:
    """The stored faces of a speed copy's recording (``extract_clip``'s ``source_faces``), or None: not a copy, no
    video, the recording not stored yet (copies come after the recordings, but several workers may overtake),
    stored from other files (a corpus changed under the store), stored without a face, or so long that its crops
    are better detected again in bounded memory than held whole (over features.spill.SPILL_BYTES). The copy then
    decodes and detects its frames, with the same result."""
    from features.extract import FACE_ARRAYS
    from features.face_landmarks import N_BLENDSHAPES
    from features.spill import SPILL_BYTES

    source = record.source_clip_id
    if source is None or not record.has_video or not store.has(source):
        return None
    stored = store.row(source)
    if (stored.get("audio_path"), stored.get("video_path")) != (record.audio_path, record.video_path):
        return None
    if not stored["has_video"]:  # no face in any frame: the recording was kept audio-only
        return None
    frame_bytes = config.face.crop_size**2 * 3 if config.face.representation == "crops" else N_BLENDSHAPES * 4  # uint8 / float32
    if stored["n_video_frames"] * frame_bytes > SPILL_BYTES:
        return None
    return store.read(source, arrays=("video_times", *FACE_ARRAYS))


@task(name="process-clip", cache_policy=NO_CACHE, task_run_name="clip-{record[clip_id]}")
def process_clip_task(record: dict[str, Any], store_path: str, config: dict[str, Any], device: str = "auto") -> ClipOutcome:
    return process_clip(ClipRecord(**record), store_path, FeatureConfig.from_dict(config), device)


@task(name="discover-clips", cache_policy=NO_CACHE)
def discover_task(dataset: str, root: str, csv_path: str | None) -> RecipeResult:
    return discover(dataset, root, csv_path)


@task(name="commit-store", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def commit_task(store_path: str, config: dict[str, Any]) -> None:
    # I/O only, hence the retries: compacting the manifest is idempotent.
    store = FeatureStore.create(store_path, FeatureConfig.from_dict(config))
    store.compact()


@flow(name="preprocess-clips", log_prints=True)
def preprocess_clips(records_file: str, store: str, config: dict[str, Any], device: str = "auto") -> list[ClipOutcome]:
    """One task per clip on the task runner the parent chose; outcomes in the order of the records.

    ``records_file``: a JSON list of ClipRecord dicts written by the parent flow. A reference, not
    the list: Prefect refuses flow-run parameters over 512 KiB, which the records of ~1,700 clips
    reach (RAVDESS with two speed copies: 1.07 MB). A subflow runs in its parent's process,
    so the file is local to it whatever runner the clip tasks go to."""
    records = json.loads(Path(records_file).read_text())
    futures = process_clip_task.map(records, store_path=unmapped(store), config=unmapped(config), device=unmapped(device))
    index = {f.task_run_id: i for i, f in enumerate(futures)}
    outcomes: list[ClipOutcome | None] = [None] * len(records)
    for future in as_completed(futures):
        i = index[future.task_run_id]
        outcomes[i] = _outcome_of(future, ClipRecord(**records[i]))
    return [o for o in outcomes if o is not None]


@flow(name="preprocess-dataset", log_prints=True)
def preprocess_dataset(
    dataset: str,
    root: str,
    store: str,
    csv_path: str | None = None,
    limit: int | None = None,
    feature_config: dict[str, Any] | None = None,
    workers: int = 1,
    dask_address: str | None = None,
    device: str = "auto",
    speed_factors: list[float] | None = None,
) -> PreprocessSummary:
    """Extract every clip of ``root`` into ``store``; finished clips are skipped.

    ``speed_factors`` (e.g. [0.9, 1.1]) also store a speed-perturbed copy of every clip at each
    factor (features/speed.py), after the clips themselves; ``limit`` counts recordings.

    Runner: ``dask_address`` (a running Dask scheduler, e.g. tcp://host:8786), else
    ``workers`` local processes when > 1, else one thread: at most that many clips are
    decoded at once. ``device`` for MTCNN and the audio encoder: auto (CUDA when the
    worker has it; local workers spread over the host's GPUs), cpu, cuda, cuda:N
    (features/devices.py).
    """
    validate_workers(workers, dask_address)
    check_device(device, dask_address)
    factors = check_speed_factors(speed_factors or [])
    config = FeatureConfig.from_dict(feature_config) if feature_config else FeatureConfig()
    config_dict = config.to_dict()
    found = discover_task(dataset, root, csv_path)
    recordings = found.records[:limit] if limit else found.records
    copies, refused = plan_speed_copies(recordings, factors)
    records = recordings + copies
    rejected = found.rejected + refused
    feature_store = FeatureStore.create(store, config)  # fail fast on a config mismatch, before any work
    summary = PreprocessSummary(store=store, config_hash=config.config_hash(), rejected=len(rejected))
    for rejection in rejected:
        summary.failures.append({"clip_id": "", "path": rejection.path, "reason": rejection.reason})
        feature_store.record_failure("", rejection.path, rejection.reason)

    # Clips already stored are counted here, not sent to the runner: a clip task costs ~0.5-1 s of
    # Prefect bookkeeping even when it only finds its clip done (RAVDESS: ~5 min to skip 1,200 clips
    # on 2 workers before this). process_clip still checks, for clips stored since this listing.
    stored = set(feature_store.clip_ids())
    summary.skipped = sum(r.clip_id in stored for r in records)
    records = [r for r in records if r.clip_id not in stored]
    clips = preprocess_clips.with_options(task_runner=task_runner_for(workers, dask_address))
    outcomes: list[ClipOutcome] = []
    if records:
        with tempfile.TemporaryDirectory(prefix="msata-records-") as folder:
            records_file = Path(folder) / "records.json"
            records_file.write_text(json.dumps([r.to_dict() for r in records]))
            outcomes = clips(str(records_file), store, config_dict, device)
    for record, outcome in zip(records, outcomes, strict=False):
        if outcome.status == "failed":
            summary.failed += 1
            summary.failures.append(
                {"clip_id": outcome.clip_id, "path": record.video_path or record.audio_path or "", "reason": outcome.reason}
            )
        elif outcome.status == "skipped":
            summary.skipped += 1
        else:
            summary.done += 1
    commit_task(store, config_dict)
    publish_preprocess_summary(dataset, summary.to_dict())
    print(
        f"preprocess-dataset: {summary.done} done, {summary.skipped} skipped, {summary.failed} failed, {summary.rejected} rejected -> {store}"
    )
    return summary


def check_device(device: str, dask_address: str | None) -> None:
    """Fail before any work on a device this host cannot give. A remote cluster's workers
    have their own GPUs, so there only the spelling is checked here; each worker checks the rest."""
    from features.devices import check_device_spelling, worker_device

    check_device_spelling(device)
    if dask_address is None:
        worker_device(device)


def _outcome_of(future: Any, record: ClipRecord) -> ClipOutcome:
    """A task that crashed on something unexpected is one failure, not the end of the dataset."""
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001 - recorded with its type and message, never swallowed
        reason = f"unexpected {type(err).__name__}: {err}"
        return ClipOutcome(record.clip_id, "failed", reason)


@contextmanager
def _flushing_api_logs() -> Iterator[None]:
    from flows.settings import flush_api_logs

    try:
        yield
    finally:
        flush_api_logs()  # before a temporary API server stops


def run_preprocessing(
    dataset: str,
    root: str | Path,
    store: str | Path,
    csv_path: str | None = None,
    workers: int = 1,
    dask_address: str | None = None,
    limit: int | None = None,
    feature_config: FeatureConfig | None = None,
    on_progress: ProgressCallback | None = None,
    device: str = "auto",
    speed_factors: tuple[float, ...] | list[float] = (),
) -> PreprocessSummary:
    """Run ``preprocess-dataset`` against PREFECT_API_URL or a temporary API.

    ``on_progress(stored, total)`` is called in this process by a thread that polls the
    store; it never travels with the flow's parameters (Dask would have to pickle it).
    """
    from flows.api import prefect_api

    validate_workers(workers, dask_address)
    check_device(device, dask_address)
    factors = check_speed_factors(speed_factors)
    root, store = str(root), str(store)
    clip_ids = [r.clip_id for r in with_speed_copies(discover(dataset, root, csv_path).records[:limit], factors)] if on_progress else []
    with prefect_api(), store_progress(store, clip_ids, on_progress), _flushing_api_logs():
        return preprocess_dataset(
            dataset=dataset,
            root=root,
            store=store,
            csv_path=csv_path,
            limit=limit,
            feature_config=(feature_config or FeatureConfig()).to_dict(),
            workers=workers,
            dask_address=dask_address,
            device=device,
            speed_factors=list(factors),
        )
