"""Prefect flow ``predict-folder``: every media file under a folder -> one Parquet of predictions.

load (validates the model once, before any file is touched) -> find files by
extension -> one task per chunk of files (paths in, a JSONL part path out; the
model is loaded once per worker process and reused by its tasks) -> collect
(``predictions.parquet``: one row per file; ``predictions.jsonl``: full timelines).
A file that cannot be predicted is a row with an ``error``, never the end of the run.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from features.recipes.folder import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS, clip_id_for
from modeling.inference.predictions import predictions_frame, read_jsonl, write_jsonl
from modeling.inference.predictor import Predictor, load_predictor, predict_files

MEDIA_EXTENSIONS: frozenset[str] = VIDEO_EXTENSIONS | AUDIO_EXTENSIONS
PARQUET_NAME, JSONL_NAME, PLOTS_DIR, PARTS_DIR = "predictions.parquet", "predictions.jsonl", "plots", ".parts"


@dataclass
class PredictSummary:
    parquet_path: str
    jsonl_path: str
    n_files: int
    n_ok: int
    n_failed: int
    n_with_warnings: int
    plot_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_media(root: str | Path, extensions: Iterable[str] | None = None, recursive: bool = True) -> list[str]:
    """Sorted media files under ``root`` (or ``root`` itself when it is a file); hidden files are skipped."""
    root = Path(root)
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in (extensions or MEDIA_EXTENSIONS)}
    if root.is_file():
        return [str(root)]
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    found = root.rglob("*") if recursive else root.glob("*")
    return sorted(
        str(p)
        for p in found
        if p.suffix.lower() in exts and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


_PREDICTORS: dict[tuple[str, str], Predictor] = {}
_PREDICTORS_LOCK = threading.Lock()


def cached_predictor(model: str, device: str = "auto") -> Predictor:
    """One Predictor (model + MTCNN) per worker process, model and device; tasks reuse it.

    The lock makes concurrent first calls from a thread pool load the model once.
    """
    with _PREDICTORS_LOCK:
        key = (model, device)
        if key not in _PREDICTORS:
            _PREDICTORS[key] = load_predictor(model, device=device)
        return _PREDICTORS[key]


def predict_chunk(
    model: str,
    paths: list[str],
    part_path: str,
    root: str,
    window_s: float = 2.0,
    hop_s: float = 0.5,
    device: str = "auto",
    plot_dir: str | None = None,
) -> str:
    """Predict ``paths`` and write their results to ``part_path`` (JSONL); plain function, no Prefect."""
    predictor = cached_predictor(model, device)
    preds = predict_files(predictor, paths, window_s, hop_s)
    if plot_dir is not None:
        from modeling.inference.timeline_plot import plot_timeline

        for pred in preds:
            if pred.ok:
                rel = Path(pred.path).relative_to(root) if Path(pred.path).is_relative_to(root) else Path(Path(pred.path).name)
                plot_timeline(pred, Path(plot_dir) / f"{clip_id_for(rel.as_posix())}.png")
    return str(write_jsonl(preds, part_path))


def collect_results(part_paths: list[str], out_dir: str, label_names: list[str]) -> PredictSummary:
    """Merge JSONL parts (in the given order) into predictions.parquet and predictions.jsonl."""
    out = Path(out_dir)
    preds = [pred for part in part_paths for pred in read_jsonl(part)]
    frame = predictions_frame(preds, label_names)
    parquet_path = out / PARQUET_NAME
    frame.to_parquet(parquet_path, engine="pyarrow", index=False)
    jsonl_path = write_jsonl(preds, out / JSONL_NAME)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    n_ok = sum(p.ok for p in preds)
    return PredictSummary(
        parquet_path=str(parquet_path),
        jsonl_path=str(jsonl_path),
        n_files=len(preds),
        n_ok=n_ok,
        n_failed=len(preds) - n_ok,
        n_with_warnings=sum(bool(p.ok and p.warnings) for p in preds),
        plot_dir=str(out / PLOTS_DIR) if (out / PLOTS_DIR).is_dir() else None,
    )


@task(name="load-model", cache_policy=NO_CACHE)
def load_model_task(model: str, device: str) -> list[str]:
    return cached_predictor(model, device).label_names


@task(name="find-media", cache_policy=NO_CACHE)
def find_media_task(root: str, extensions: list[str] | None, recursive: bool) -> list[str]:
    return find_media(root, extensions, recursive)


@task(name="predict-files", cache_policy=NO_CACHE)
def predict_chunk_task(
    model: str, paths: list[str], part_path: str, root: str, window_s: float, hop_s: float, device: str, plot_dir: str | None
) -> str:
    return predict_chunk(model, paths, part_path, root, window_s, hop_s, device, plot_dir)


@task(name="collect-predictions", cache_policy=NO_CACHE)
def collect_task(part_paths: list[str], out_dir: str, label_names: list[str]) -> PredictSummary:
    return collect_results(part_paths, out_dir, label_names)


@flow(name="predict-folder", log_prints=True)
def predict_folder(
    model: str,
    input_dir: str,
    out_dir: str,
    extensions: list[str] | None = None,
    recursive: bool = True,
    window_s: float = 2.0,
    hop_s: float = 0.5,
    device: str = "auto",
    files_per_task: int = 8,
    plots: bool = False,
) -> PredictSummary:
    """Predict every media file under ``input_dir``; results go to ``out_dir``.

    ``model``: checkpoint path or MLflow model URI. Progress: ``run_prediction`` counts
    the finished parts from the calling process (no callback travels with the flow).
    """
    if files_per_task < 1:
        raise ValueError(f"files_per_task must be >= 1, got {files_per_task}")
    label_names = load_model_task(model, device)  # a bad model fails here, before any decoding
    paths = find_media_task(input_dir, extensions, recursive)
    out = Path(out_dir)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    plot_dir = str(out / PLOTS_DIR) if plots else None
    chunks = [paths[i : i + files_per_task] for i in range(0, len(paths), files_per_task)]
    part_paths = [str(out / PARTS_DIR / f"part-{i:05d}.jsonl") for i in range(len(chunks))]
    futures = [
        predict_chunk_task.submit(model, chunk, part, str(input_dir), window_s, hop_s, device, plot_dir)
        for chunk, part in zip(chunks, part_paths, strict=False)
    ]
    for future in as_completed(futures):
        future.result()  # predict_files records per-file errors; anything raised here is a real failure
    summary = collect_task(part_paths, out_dir, label_names)
    print(
        f"predict-folder: {summary.n_ok} predicted, {summary.n_failed} failed, {summary.n_with_warnings} with warnings -> {summary.parquet_path}"
    )
    return summary


def finished_files(out_dir: str | Path) -> int:
    """Files predicted so far: the lines of the finished JSONL parts (each part is written at once)."""
    parts = Path(out_dir) / PARTS_DIR
    if not parts.is_dir():
        return 0
    total = 0
    for part in parts.glob("part-*.jsonl"):
        try:
            total += sum(1 for line in part.read_text().splitlines() if line.strip())
        except FileNotFoundError:  # collected and removed meanwhile
            continue
    return total


def run_prediction(
    model: str,
    input_dir: str | Path,
    out_dir: str | Path,
    workers: int = 1,
    dask_address: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> PredictSummary:
    """Run ``predict-folder`` on threads (1 worker) or a Dask cluster; kwargs go to the flow.

    ``on_progress(files_done, files_total)`` is called from a thread of this process that
    counts the finished parts: nothing unpicklable is sent with the flow.
    """
    from flows.api import prefect_api
    from flows.runners import task_runner_for

    flow_fn = predict_folder.with_options(task_runner=task_runner_for(workers, dask_address))
    total = len(find_media(input_dir, kwargs.get("extensions"), kwargs.get("recursive", True))) if on_progress else 0
    stop = threading.Event()

    def poll() -> None:
        done = 0
        while not stop.wait(0.5):  # the parts are removed once collected: never report fewer than before
            done = max(done, min(finished_files(out_dir), total))
            on_progress(done, total)

    poller = threading.Thread(target=poll, name="msata-predict-progress", daemon=True) if on_progress else None
    with prefect_api():
        if poller is not None:
            on_progress(0, total)
            poller.start()
        try:
            summary = flow_fn(model=str(model), input_dir=str(input_dir), out_dir=str(out_dir), **kwargs)
        finally:
            stop.set()
            if poller is not None:
                poller.join(timeout=10)
    if on_progress is not None:
        on_progress(summary.n_files, total)
    return summary
