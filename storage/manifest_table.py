"""Pure helpers of the feature store: clip-array layout, validation, manifest rows.

No I/O here except (de)serialising JSON and Parquet bytes; ``feature_store.py`` does the
file-system work.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from zarr.codecs import BloscCodec

from features.clip import ClipFeatures
from features.config import FeatureConfig
from features.manifest import SAFE_ID, ClipRecord

# name -> (dtype, frames per chunk). Crops dominate the size: ~32 frames (~1 s) per
# chunk keeps a random crop window cheap to read while chunks stay around 0.9 MB raw.
ARRAYS: dict[str, tuple[np.dtype, int]] = {
    "logmel": (np.dtype("float32"), 1024),
    "audio_states": (np.dtype("float16"), 256),  # (Ta, L, D): ~1.8 MB raw per chunk for Whisper base
    "audio_times": (np.dtype("float64"), 4096),
    "face_crops": (np.dtype("uint8"), 32),
    "video_times": (np.dtype("float64"), 4096),
    "face_mask": (np.dtype("bool"), 4096),
    "face_boxes": (np.dtype("float32"), 4096),
    "face_landmarks": (np.dtype("float32"), 4096),
    "face_probs": (np.dtype("float32"), 4096),
    "face_blendshapes": (np.dtype("float32"), 4096),  # (Tv, 52)
}
AUDIO_ARRAYS = {"logmel": ("logmel", "audio_times"), "encoder": ("audio_states", "audio_times")}
VIDEO_ARRAYS = {"crops": ("face_crops", "video_times", "face_mask"), "blendshapes": ("face_blendshapes", "video_times", "face_mask")}
VIDEO_REQUIRED = VIDEO_ARRAYS["crops"]
VIDEO_OPTIONAL = ("face_boxes", "face_landmarks", "face_probs")  # MTCNN's, with crops only

MANIFEST_SCHEMA = pa.schema(
    [pa.field(f.name, pa.string()) for f in fields(ClipRecord)]  # every ClipRecord field is str | None
    + [
        pa.field("has_audio", pa.bool_()),
        pa.field("has_video", pa.bool_()),
        pa.field("n_audio_frames", pa.int64()),
        pa.field("n_video_frames", pa.int64()),
        pa.field("duration_s", pa.float64()),
        pa.field("face_ratio", pa.float64()),
        pa.field("notes", pa.string()),
        pa.field("config_hash", pa.string()),
    ]
)
FAILURE_SCHEMA = pa.schema([pa.field("clip_id", pa.string()), pa.field("path", pa.string()), pa.field("reason", pa.string())])
NOTES_SEPARATOR = "; "


def file_key(clip_id: str) -> str:
    """File-name-safe key for any id (failures may be recorded for unparsed names)."""
    if SAFE_ID.match(clip_id):
        return clip_id
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", clip_id)[:120].lstrip(".")
    return f"_{safe}-{hashlib.sha1(clip_id.encode()).hexdigest()[:10]}"


def failure_file_name(clip_id: str, path: str) -> str:
    # Keyed by path too: recipes report rejections without a clip id, often several per id.
    return f"{file_key(clip_id)}~{hashlib.sha1(path.encode()).hexdigest()[:8]}.json"


def _expected_shapes(config: FeatureConfig, n_audio: int, n_video: int) -> dict[str, tuple[int, ...]]:
    side = config.face.crop_size
    states = config.audio_encoder.state_shape() if not config.audio_encoder.is_log_mel else (0, 0)
    return {
        "logmel": (n_audio, config.audio.n_mels),
        "audio_states": (n_audio, *states),
        "audio_times": (n_audio,),
        "face_crops": (n_video, side, side, 3),
        "video_times": (n_video,),
        "face_mask": (n_video,),
        "face_boxes": (n_video, 4),
        "face_landmarks": (n_video, 5, 2),
        "face_probs": (n_video,),
        "face_blendshapes": (n_video, 52),
    }


def validated_arrays(features: ClipFeatures, config: FeatureConfig) -> dict[str, np.ndarray]:
    """The present arrays, cast to the contract dtypes; ValueError on any inconsistency.

    Casting follows numpy's ``same_kind`` rule (float64 -> float32 is fine, float
    -> uint8 is not), so a wrong extractor output fails here, not at training time.
    """
    present = {name: getattr(features, name) for name in ARRAYS if getattr(features, name) is not None}
    where = f"clip {features.clip_id!r}"
    audio_arrays = AUDIO_ARRAYS["logmel" if config.audio_encoder.is_log_mel else "encoder"]
    foreign = [name for name in ("logmel", "audio_states") if name in present and name not in audio_arrays]
    if foreign:
        raise ValueError(f"{where}: {foreign} do not belong in a store of audio encoder {config.audio_encoder.name!r}")
    video_arrays = VIDEO_ARRAYS[config.face.representation]
    foreign = [name for name in ("face_crops", "face_blendshapes") if name in present and name not in video_arrays]
    if foreign:
        raise ValueError(f"{where}: {foreign} do not belong in a store of face representation {config.face.representation!r}")
    for group in (audio_arrays, video_arrays):
        given = [name for name in group if name in present]
        if given and len(given) != len(group):
            raise ValueError(f"{where}: {given} given without {[n for n in group if n not in present]}")
    orphans = [name for name in VIDEO_OPTIONAL if name in present and "face_crops" not in present]
    if orphans:
        raise ValueError(f"{where}: {orphans} given without face_crops")
    if not np.isfinite(features.duration_s) or features.duration_s < 0:
        raise ValueError(f"{where}: duration_s must be finite and >= 0, got {features.duration_s}")

    n_audio = features.n_audio_frames
    n_video = len(present[video_arrays[0]]) if video_arrays[0] in present else 0
    shapes = _expected_shapes(config, n_audio, n_video)
    out: dict[str, np.ndarray] = {}
    for name, value in present.items():
        array = np.asarray(value)
        if array.shape != shapes[name]:
            raise ValueError(f"{where}: {name} has shape {array.shape}, expected {shapes[name]} for config {config.config_hash()}")
        try:
            out[name] = np.ascontiguousarray(array.astype(ARRAYS[name][0], casting="same_kind", copy=False))
        except TypeError as err:
            raise ValueError(f"{where}: {name} dtype {array.dtype} cannot become {ARRAYS[name][0]}") from err
    for name in ("audio_times", "video_times"):
        times = out.get(name)
        if times is not None and (not np.all(np.isfinite(times)) or np.any(np.diff(times) < 0)):
            raise ValueError(f"{where}: {name} must be finite and non-decreasing")
    return out


def chunk_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (ARRAYS[name][1], *shape[1:])


def manifest_row(record: ClipRecord, features: ClipFeatures, config_hash: str) -> bytes:
    """One manifest row as JSON; has_* and counts describe what was stored, not what the record promised.

    Per-clip rows are JSON, not single-row Parquet files: reading 3,000 of those took
    16 s (2-5 ms of Parquet overhead each) against 0.15 s as JSON. The table built
    from them, and the ``compact()`` snapshot, are typed by ``MANIFEST_SCHEMA``.
    """
    row: dict[str, Any] = record.to_dict()
    row.update(
        has_audio=features.has_audio,
        has_video=features.has_video,
        n_audio_frames=features.n_audio_frames,
        n_video_frames=len(features.video_features) if features.video_features is not None else 0,
        duration_s=float(features.duration_s),
        face_ratio=features.face_ratio if features.has_video else 0.0,
        notes=NOTES_SEPARATOR.join(features.notes),
        config_hash=config_hash,
    )
    return json.dumps(row).encode()  # Python floats round-trip exactly through repr


def failure_row(clip_id: str, path: str, reason: str) -> bytes:
    return json.dumps({"clip_id": clip_id, "path": path, "reason": reason}).encode()


def rows_to_table(rows: list[bytes], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([json.loads(row) for row in rows], schema=schema)


def to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def from_parquet_bytes(data: bytes, schema: pa.Schema) -> pa.Table:
    # select + cast pins column order and types so it concatenates with the JSON rows. A snapshot
    # written before a column existed (e.g. ``speed``) gets it as nulls, as its JSON rows do.
    table = pq.read_table(io.BytesIO(data))
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
    return table.select(schema.names).cast(schema)


def concat_sorted(tables: list[pa.Table], schema: pa.Schema, key: tuple[str, ...] = ("clip_id",)) -> pa.Table:
    """One table sorted by ``key``; for a repeated key the row from the later table wins."""
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    keys = list(zip(*(table.column(name).to_pylist() for name in key), strict=False))
    last = {k: i for i, k in enumerate(keys)}
    return table.take(pa.array([last[k] for k in sorted(last)], pa.int64()))


def group_json(attributes: dict[str, Any]) -> bytes:
    """A complete Zarr v3 group metadata document, so the store can publish it atomically itself."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=2).encode()


def compressor(dtype: np.dtype) -> BloscCodec:
    # Byte-shuffle helps multi-byte numbers (times, mel energies); it is a no-op for uint8/bool.
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle" if dtype.itemsize > 1 else "noshuffle")
