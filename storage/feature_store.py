"""FeatureStore: per-clip Zarr v3 groups plus a Parquet manifest, with atomic commits.

Layout under the store root (a local path or an fsspec URL)::

    zarr.json                  root group; attrs["msata_feature_store"] = layout version,
                               feature config, config hash, feature format version
    clips/zarr.json            group of all clips
    clips/<clip_id>/           one group per clip: logmel, audio_times, face_* arrays
    manifest/<clip_id>.json    one manifest row per committed clip: the commit marker
    manifest.parquet           snapshot of the manifest table written by compact() (an index: rows win)
    failures/<key>~<h>.json    one failure row per (clip_id, path) (key = clip_id made file-safe)
    _staging/                  clips and files being written; never read

Commit protocol (``write``): the clip group is written under ``_staging/``, moved to
``clips/<clip_id>`` and only then is its manifest row written. A clip is visible
(``has``, ``read``, ``manifest``) only once its row exists, so a writer killed at
any point leaves nothing visible; its staging leftovers are removed by the next
``create`` (owner process dead on this host, or older than ``stale_after_s``), and
a clip directory left without a row is replaced by the next write of that clip.
Each writer only ever creates files named after its own clip, so any number of
processes can write different clips concurrently without locks.

Guarantees: on a local file system (plain paths and ``file://``) the move is one
``os.rename`` and each row file appears through ``os.replace``, both atomic.
On object stores (``s3://``, ``gs://``, ``memory://``...) ``fs.mv`` copies object by
object; visibility still hinges on the single-object PUT of the row file, which
object stores make atomic, but creating the root metadata is not exclusive
(two creators with different configs racing on a new store are not detected).
Durability after power loss is not promised (no fsync).
"""

from __future__ import annotations

import asyncio
import json
import math
import mmap
import os
import warnings
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import zarr
import zarr.api.asynchronous
from fsspec.implementations.local import LocalFileSystem
from zarr.core.sync import sync as zarr_sync
from zarr.errors import ZarrUserWarning

from features.clip import TIMED_ARRAYS, ClipFeatures, frames_in_window
from features.config import FeatureConfig
from features.manifest import ClipRecord
from storage.manifest_table import (
    FAILURE_SCHEMA,
    MANIFEST_SCHEMA,
    SAFE_ID,
    chunk_shape,
    compressor,
    concat_sorted,
    failure_file_name,
    failure_row,
    file_key,
    from_parquet_bytes,
    group_json,
    manifest_row,
    rows_to_table,
    to_parquet_bytes,
    validated_arrays,
)
from storage.store_files import STAGING, ConfigMismatchError, StoreError, StoreFiles

if TYPE_CHECKING:  # pandas is only needed by readers of the manifest; workers that write skip its import
    import pandas as pd

__all__ = ["ConfigMismatchError", "FeatureStore", "StoreError"]

LAYOUT_VERSION = 1
ROOT_ATTR = "msata_feature_store"
CLIPS, MANIFEST_DIR, FAILURES_DIR, COMPACTED = "clips", "manifest", "failures", "manifest.parquet"
STALE_AFTER_S = 6 * 3600.0  # a clip write takes seconds; older staging leftovers are dead
# A clip array larger than this is written a slice of whole chunks at a time: a long clip's crops may be a
# memmap over a spill file (features/spill.py), and one zarr call over all of it would read every page
# in at once (zarr encodes a call's chunks concurrently). Same bound as the spill and the decode chunks.
WRITE_SLICE_BYTES = 64 * 2**20

# Each clip group carries inline consolidated metadata (a zarr-python extension, read by
# zarr-python only): one metadata read per clip instead of nine halves read latency.
# Filtered here rather than with catch_warnings, which is not thread-safe.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=ZarrUserWarning)


def _root_attrs(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, Any] | None:
    """The store attributes of the root zarr.json; None when there is none."""
    try:
        document = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{url}/zarr.json is not valid JSON: {err}") from err
    attrs = document.get("attributes", {}).get(ROOT_ATTR) if isinstance(document, dict) else None
    if attrs is None:
        raise StoreError(f"{url} is a Zarr hierarchy but not a feature store (no {ROOT_ATTR!r} attribute)")
    if attrs.get("layout_version") != LAYOUT_VERSION:
        raise StoreError(f"{url} has store layout {attrs.get('layout_version')}, this code reads {LAYOUT_VERSION}")
    return attrs


TIME_ARRAY_OF = {name: times for times, names in TIMED_ARRAYS.items() for name in (times, *names)}


async def _read_group(
    store: zarr.abc.store.Store,
    wanted: Collection[str] | None,
    skip: Collection[str],
    window: tuple[float, float] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(group attributes, {array name: array}) of one clip group, the arrays read concurrently: whole, or with a
    ``window`` only the rows of the frames inside it (each stream's timestamps are read first, 8 bytes a frame)."""
    group = await zarr.api.asynchronous.open_group(store, mode="r", zarr_format=3, use_consolidated=True)
    attrs = dict(group.attrs)
    names = [n for n in attrs["arrays"] if (wanted is None or n in wanted) and n not in skip]
    if window is None:
        handles = await asyncio.gather(*(group.getitem(n) for n in names))
        values = await asyncio.gather(*(h.getitem(Ellipsis) for h in handles))
        return attrs, {name: np.asarray(value) for name, value in zip(names, values, strict=True)}
    streams = sorted({TIME_ARRAY_OF[n] for n in names if n in TIME_ARRAY_OF})
    missing = [t for t in streams if t not in attrs["arrays"]]
    if missing:
        raise StoreError(f"clip {attrs.get('clip_id')!r} has frames without their timestamps {missing}: it cannot be read by time")
    time_handles = await asyncio.gather(*(group.getitem(t) for t in streams))
    times = dict(zip(streams, await asyncio.gather(*(h.getitem(Ellipsis) for h in time_handles)), strict=True))
    keep = {t: frames_in_window(np.asarray(times[t]), window) for t in streams}
    spans = {}  # stream -> (first, last + 1) of its kept frames: one contiguous read, the mask then applied to it
    for t, mask in keep.items():
        kept = np.flatnonzero(mask)
        spans[t] = (int(kept[0]), int(kept[-1]) + 1) if len(kept) else (0, 0)
    rows = [n for n in names if n not in times]  # the timestamps themselves are read already
    handles = await asyncio.gather(*(group.getitem(n) for n in rows))
    selections = [slice(*spans[TIME_ARRAY_OF[n]]) if n in TIME_ARRAY_OF else Ellipsis for n in rows]
    values = await asyncio.gather(*(h.getitem(sel) for h, sel in zip(handles, selections, strict=True)))
    arrays = {t: np.asarray(times[t])[keep[t]] for t in streams if t in names}
    for name, value in zip(rows, values, strict=True):
        array = np.asarray(value)
        if name in TIME_ARRAY_OF:
            first, end = spans[TIME_ARRAY_OF[name]]
            array = array[keep[TIME_ARRAY_OF[name]][first:end]]  # all True unless a stream's times are not sorted
        arrays[name] = array
    return attrs, {name: arrays[name] for name in names}


class FeatureStore:
    """Use ``FeatureStore.create`` (read-write) or ``FeatureStore.open`` (read-only)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, config: FeatureConfig, read_only: bool) -> None:
        self.url, self.config, self.read_only = url, config, read_only
        self.config_hash = config.config_hash()
        self._files = StoreFiles(fs, root)

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, config_hash={self.config_hash!r}, read_only={self.read_only})"

    @property
    def spill_dir(self) -> str | None:
        """Where extraction should spill a long clip's crops (extract_clip's ``spill_dir``): the store's
        staging folder on a local store, the same disk the features go to; None (the system's temporary
        folder) for object stores."""
        return self._files.join(STAGING) if self._files.local and not self.read_only else None

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        config: FeatureConfig,
        storage_options: dict[str, Any] | None = None,
        stale_after_s: float = STALE_AFTER_S,
    ) -> FeatureStore:
        """Create the store, or open it for writing when it exists with the same config hash."""
        fs, root, url = cls._resolve(path, storage_options)
        store = cls(fs, root, url, config, read_only=False)
        stored = _root_attrs(fs, root, url)
        if stored is None:
            store._init_layout()
            stored = _root_attrs(fs, root, url)
            if stored is None:
                raise StoreError(f"{url}: the root metadata just written cannot be read back")
        if stored["config_hash"] != store.config_hash:
            raise ConfigMismatchError(
                f"feature store {url} was built with feature config {stored['config_hash']}, "
                f"refusing to add features of config {store.config_hash}: use another store path or the same config"
            )
        store._files.clean_staging(stale_after_s)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> FeatureStore:
        """Open an existing store read-only; StoreError naming the path otherwise."""
        fs, root, url = cls._resolve(path, storage_options)
        stored = _root_attrs(fs, root, url)
        if stored is None:
            raise StoreError(f"{url} is not a feature store (missing, empty, or no zarr.json at its root)")
        store = cls(fs, root, url, FeatureConfig.from_dict(stored["feature_config"]), read_only=True)
        store.config_hash = stored["config_hash"]  # the hash the rows carry, even if FeatureConfig gained fields since
        return store

    @staticmethod
    def _resolve(path: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> tuple[Any, str, str]:
        fs, root = fsspec.core.url_to_fs(os.fspath(path), **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):
            root = os.path.abspath(root)
            return fs, root, root
        root = root.rstrip("/")
        return fs, root, fs.unstrip_protocol(root)

    def _init_layout(self) -> None:
        files = self._files
        foreign = set(files.names("")) - {STAGING, CLIPS, MANIFEST_DIR, FAILURES_DIR}
        if foreign:
            raise StoreError(f"{self.url} is not empty and not a feature store ({sorted(foreign)[:5]}): refusing to write into it")
        for folder in (STAGING, CLIPS, MANIFEST_DIR, FAILURES_DIR):
            files.fs.makedirs(files.join(folder), exist_ok=True)
        files.write_file(files.join(CLIPS, "zarr.json"), group_json({}))
        attrs = {
            "layout_version": LAYOUT_VERSION,
            "format_version": self.config.format_version,
            "config_hash": self.config_hash,
            "feature_config": self.config.to_dict(),
        }
        # Published last and exclusively: a concurrent creator either wins or is checked against it.
        files.write_file(files.join("zarr.json"), group_json({ROOT_ATTR: attrs}), exclusive=True)

    # ------------------------------------------------------------------ reading
    def has(self, clip_id: str) -> bool:
        return bool(SAFE_ID.match(clip_id)) and self._files.exists(self._files.join(MANIFEST_DIR, f"{clip_id}.json"))

    def row(self, clip_id: str) -> dict[str, Any]:
        """One committed clip's manifest row (its record, counts and duration) as stored, without reading the table."""
        if not self.has(clip_id):
            raise KeyError(f"clip {clip_id!r} is not in feature store {self.url}")
        return json.loads(self._files.cat_many([self._files.join(MANIFEST_DIR, f"{clip_id}.json")])[0])

    def clip_ids(self) -> list[str]:
        """Committed clip ids, sorted (one listing, cheaper than many ``has`` calls)."""
        return sorted(n[: -len(".json")] for n in self._files.names(MANIFEST_DIR) if n.endswith(".json"))

    def read(
        self,
        clip_id: str,
        arrays: Collection[str] | None = None,
        skip: Collection[str] = (),
        window: tuple[float, float] | None = None,
    ) -> ClipFeatures:
        """The clip's features; ``arrays`` limits the read to those arrays, ``skip`` leaves those out (None).

        ``window=(t0, t1)`` (finite seconds, t0 <= t1) reads only the frames with ``t0 <= time < t1`` of each stream,
        from the chunks that hold them: a training crop of a long clip costs its own length, not the clip's. Times stay
        the clip's (not re-based) and ``duration_s`` is the whole clip's. The whole clip: ``window=None``."""
        if window is not None and not (math.isfinite(window[0]) and math.isfinite(window[1]) and window[0] <= window[1]):
            raise ValueError(f"read window {window}: expected (t0, t1) in seconds, both finite, t0 <= t1 (None reads the whole clip)")
        if not self.has(clip_id):
            raise KeyError(f"clip {clip_id!r} is not in feature store {self.url}")
        store = self._files.zarr_store(self._files.join(CLIPS, clip_id), read_only=True)
        # One trip into zarr's event loop for the whole clip, its arrays read concurrently: a
        # synchronous read per array paid ~2.5 ms of overhead each (6 arrays: 24 -> 16 ms per
        # CREMA-D-sized clip, bench/bench_data_reader.py). zarr's own sync bridge, as its sync API uses.
        attrs, data = zarr_sync(_read_group(store, arrays, skip, window))
        return ClipFeatures(clip_id=clip_id, duration_s=float(attrs["duration_s"]), notes=list(attrs["notes"]), **data)

    def manifest(self) -> pd.DataFrame:
        """One row per committed clip, sorted by clip_id (row files + compacted snapshot)."""
        return self._manifest_table().to_pandas()

    def _manifest_table(self) -> pa.Table:
        ids = set(self.clip_ids())
        tables: list[pa.Table] = []
        compacted = self._files.cat_many([self._files.join(COMPACTED)])
        if compacted:
            snapshot = from_parquet_bytes(compacted[0], MANIFEST_SCHEMA)
            keep = [i for i, cid in enumerate(snapshot.column("clip_id").to_pylist()) if cid in ids]
            tables.append(snapshot.take(pa.array(keep, pa.int64())))
        covered = set(tables[0].column("clip_id").to_pylist()) if tables else set()
        rows = [self._files.join(MANIFEST_DIR, f"{cid}.json") for cid in sorted(ids - covered)]
        tables.append(rows_to_table(self._files.cat_many(rows), MANIFEST_SCHEMA))
        return concat_sorted(tables, MANIFEST_SCHEMA)

    def failures(self) -> pd.DataFrame:
        """clip_id, path, reason of clips that failed and have not been written since."""
        paths = [self._files.join(FAILURES_DIR, n) for n in self._files.names(FAILURES_DIR) if n.endswith(".json")]
        table = rows_to_table(self._files.cat_many(paths), FAILURE_SCHEMA)
        frame = concat_sorted([table], FAILURE_SCHEMA, key=("clip_id", "path")).to_pandas()
        # A writer killed between its commit and clearing its failure leaves a stale row: hide it.
        return frame[~frame["clip_id"].isin(set(self.clip_ids()))].reset_index(drop=True)

    # ------------------------------------------------------------------ writing
    def write(self, record: ClipRecord, features: ClipFeatures) -> bool:
        """Commit one clip atomically; False (and nothing written) when it is already committed."""
        self._require_writable()
        clip_id = record.clip_id
        if not SAFE_ID.match(clip_id):
            raise ValueError(f"clip_id {clip_id!r} is not a safe path component ({SAFE_ID.pattern})")
        if features.clip_id != clip_id:
            raise ValueError(f"record is clip {clip_id!r} but the features are of clip {features.clip_id!r}")
        arrays = validated_arrays(features, self.config)
        if self.has(clip_id):
            return False
        row = manifest_row(record, features, self.config_hash)
        attrs = {
            "clip_id": clip_id,
            "duration_s": float(features.duration_s),
            "notes": list(features.notes),
            "arrays": list(arrays),
            "record": record.to_dict(),
            "config_hash": self.config_hash,
        }
        files = self._files
        stage = files.staging_path(clip_id)
        try:
            self._write_group(stage, arrays, attrs)
            published = files.move_dir(stage, files.join(CLIPS, clip_id), committed=lambda: self.has(clip_id))
            if published:
                files.write_file(files.join(MANIFEST_DIR, f"{clip_id}.json"), row)  # the commit
        except BaseException:
            files.discard(stage)
            raise
        if not published:  # another writer committed this clip first
            files.remove(stage)
            return False
        prefix = f"{file_key(clip_id)}~"  # '~' never occurs in a key, so this matches this clip only
        for name in files.names(FAILURES_DIR):
            if name.startswith(prefix):
                files.remove(files.join(FAILURES_DIR, name))
        return True

    def record_failure(self, clip_id: str, path: str, reason: str) -> None:
        """One row per (clip_id, path): recording the same pair again replaces its reason."""
        self._require_writable()
        data = failure_row(clip_id, path, reason)
        self._files.write_file(self._files.join(FAILURES_DIR, failure_file_name(clip_id, path)), data)

    def compact(self) -> int:
        """Snapshot the manifest into ``manifest.parquet`` so ``manifest()`` reads one file; returns its rows."""
        self._require_writable()
        table = self._manifest_table()
        self._files.write_file(self._files.join(COMPACTED), to_parquet_bytes(table))
        return table.num_rows

    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"feature store {self.url} was opened read-only; use FeatureStore.create to write")

    def _write_group(self, path: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        store = self._files.zarr_store(path, read_only=False)
        group = zarr.open_group(store, mode="w", zarr_format=3, attributes=attrs)
        for name, array in arrays.items():
            target = group.create_array(
                name, shape=array.shape, dtype=array.dtype, chunks=chunk_shape(name, array.shape), compressors=compressor(array.dtype)
            )
            if array.size:
                _write_in_slices(target, array, chunk_shape(name, array.shape)[0])
        zarr.consolidate_metadata(store)


def _write_in_slices(target: zarr.Array, array: np.ndarray, chunk_frames: int) -> None:
    """``target[...] = array`` in slices of whole chunks of at most WRITE_SLICE_BYTES (one call when it
    fits), so the stored chunks are the same either way. When ``array`` is backed by a memory map (a
    spilled clip), the pages each slice read are dropped from this process afterwards (MADV_DONTNEED:
    they are clean file pages, read again from the file if needed), so resident memory stays bounded."""
    frame_bytes = max(1, array.nbytes // len(array))
    step = max(1, WRITE_SLICE_BYTES // (frame_bytes * chunk_frames)) * chunk_frames
    if step >= len(array):
        target[...] = array
        return
    mapping = _mapping_of(array)
    for start in range(0, len(array), step):
        target[start : start + step] = array[start : start + step]
        if mapping is not None and hasattr(mapping, "madvise"):
            mapping.madvise(mmap.MADV_DONTNEED)


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The mmap under ``array`` (an np.memmap or a view of one), or None for memory of its own."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, mmap.mmap) else None
