"""Folder recipe: a folder of media files plus a CSV ``path,label,speaker[,split]``.

``path`` is relative to the folder (POSIX or Windows separators). The modality is
decided by extension: a video container gives audio_path = video_path = the file
(extraction finds out whether it really has a sound track); an audio container
gives an audio-only clip. Every unusable row (missing/zero-length/unknown file,
path outside the folder, empty label or speaker, unknown split, duplicate path)
becomes a Rejection; only an unreadable CSV or one without the required columns
raises. Labels and speakers are kept as written (whitespace stripped); split
values are normalised to train/val/test.

clip_id: the relative path without its extension, ``/`` -> ``__`` and any other
character outside ``[A-Za-z0-9._-]`` -> ``_`` (e.g. ``Bob/take 1.mp4`` ->
``Bob__take_1``). When two files map to the same id (``a.mp4`` and ``a.wav``,
``a b`` and ``a_b``) every one of them gets ``-`` + 8 hex digits of the SHA-1 of its
relative path, so ids do not depend on row order.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from pathlib import Path, PurePosixPath

from features.manifest import ClipRecord, RecipeResult, Rejection

DATASET = "folder"
VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".flv"})
AUDIO_EXTENSIONS: frozenset[str] = frozenset({".wav", ".flac", ".mp3", ".ogg", ".m4a"})
REQUIRED_COLUMNS = ("path", "label", "speaker")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
MAX_ID_LENGTH = 120  # leaves room for store staging suffixes under the 255-byte file-name limit

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def clip_id_for(relative: str) -> str:
    """Path-safe id of a relative media path (before collision suffixes)."""
    stem = str(PurePosixPath(relative).with_suffix(""))
    safe = _UNSAFE.sub("_", stem.replace("/", "__"))
    safe = "_" + safe[1:] if safe.startswith(".") else safe
    if len(safe) > MAX_ID_LENGTH:
        safe = safe[: MAX_ID_LENGTH - 9] + "-" + _digest(relative)
    return safe


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _relative(raw: str) -> PurePosixPath | str:
    """Normalised relative path, or the reason it is not acceptable."""
    rel = PurePosixPath(raw.replace("\\", "/"))
    if rel.is_absolute() or re.match(r"^[A-Za-z]:", raw):
        return f"absolute path {raw!r}: paths must be relative to the folder"
    if ".." in rel.parts:
        return f"path {raw!r} leaves the folder"
    return rel


def prepare_folder(root: str | os.PathLike[str], csv_path: str | os.PathLike[str] | None = None, dataset: str = DATASET) -> RecipeResult:
    """Clips listed in ``csv_path`` (default ``root/labels.csv``), sorted by clip_id."""
    base = Path(root).expanduser().absolute()
    if not base.is_dir():
        raise FileNotFoundError(f"media folder {base} is not a directory")
    table = Path(csv_path).expanduser().absolute() if csv_path is not None else base / "labels.csv"
    if not table.is_file():
        raise FileNotFoundError(f"label CSV {table} not found")

    rejected: list[Rejection] = []
    rows: list[tuple[str, ClipRecord]] = []  # (relative path, record with a provisional id)
    first_line: dict[str, int] = {}
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{table}: missing column(s) {missing}; found {header}, need path,label,speaker[,split]")
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            where = f"{table}:{line}"
            if row.get(None):  # DictReader files surplus cells under the None key
                rejected.append(Rejection(where, f"{len(header) + len(row[None])} fields, header has {len(header)}"))
                continue
            values = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if not values["path"]:
                rejected.append(Rejection(where, "empty path"))
                continue
            rel = _relative(values["path"])
            if isinstance(rel, str):
                rejected.append(Rejection(where, rel))
                continue
            media = base / rel
            reason = _row_problem(media, values)
            if reason is None and str(rel) in first_line:
                reason = f"listed twice (first on line {first_line[str(rel)]})"
            if reason is not None:
                rejected.append(Rejection(str(media), f"{rel}: {reason} ({where})"))  # reasons read well alone
                continue
            first_line[str(rel)] = line
            is_video = media.suffix.lower() in VIDEO_EXTENSIONS
            split = values.get("split", "")
            record = ClipRecord(
                clip_id=clip_id_for(str(rel)),
                dataset=dataset,
                speaker=values["speaker"],
                label=values["label"],
                audio_path=str(media),
                video_path=str(media) if is_video else None,
                split=SPLIT_ALIASES[split.lower()] if split else None,
            )
            rows.append((str(rel), record))

    counts = Counter(record.clip_id for _, record in rows)
    records: list[ClipRecord] = []
    taken: set[str] = set()
    for rel, record in rows:
        if counts[record.clip_id] > 1:
            record = _with_id(record, f"{record.clip_id}-{_digest(rel)}")
        if record.clip_id in taken:  # only if a suffixed id equals another file's plain id
            rejected.append(Rejection(record.audio_path or rel, f"clip id {record.clip_id!r} already used"))
            continue
        taken.add(record.clip_id)
        records.append(record)
    return RecipeResult(records=sorted(records, key=lambda r: r.clip_id), rejected=sorted(rejected, key=lambda r: r.path))


def _row_problem(media: Path, values: dict[str, str]) -> str | None:
    suffix = media.suffix.lower()
    if suffix not in VIDEO_EXTENSIONS | AUDIO_EXTENSIONS:
        known = ", ".join(sorted(VIDEO_EXTENSIONS | AUDIO_EXTENSIONS))
        return f"extension {suffix or '(none)'} is not a known media type ({known})"
    if not media.is_file():
        return "file not found"
    if media.stat().st_size == 0:
        return "zero-length file"
    if not values["label"]:
        return "empty label"
    if not values["speaker"]:
        return "empty speaker"
    split = values.get("split", "")
    if split and split.lower() not in SPLIT_ALIASES:
        return f"unknown split {split!r}; use one of {sorted(SPLIT_ALIASES)}"
    return None


def _with_id(record: ClipRecord, clip_id: str) -> ClipRecord:
    return ClipRecord(**{**record.to_dict(), "clip_id": clip_id})
