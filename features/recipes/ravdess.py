"""RAVDESS recipe: ``Actor_XX/MM-VV-EE-II-SS-RR-AA.<ext>`` -> ClipRecords.

Name fields: modality (01 audio-video, 02 video-only, 03 audio-only), vocal
channel (01 speech, 02 song), emotion (01-08, ``RAVDESS_LABELS`` order),
intensity (01 normal, 02 strong; neutral has no strong take), statement (01/02),
repetition (01/02), actor (01-24).

clip_id is the name *without* the modality field (``VV-EE-II-SS-RR-AA``): it
names a take, and every file of one take maps to the same id, so pairing is a
plain group-by. Per take:
  * an audio-video file (01) gives audio_path = video_path = that file; 02/03
    files of the same take are superseded (listed as rejections with the reason);
  * else a video-only file (02) and an audio file (03) are paired into one
    audio-visual clip (video from the 02 file, audio from the 03 file);
  * else the single modality present gives a video-only or audio-only clip.
Several files for the same take and modality (e.g. .wav and .flac): the first by
path wins, the others are rejected as duplicates. Takes of the other vocal
channel are skipped (a filter, not a failure).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

from features.manifest import ClipRecord, RecipeResult, Rejection
from features.recipes.folder import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS

DATASET = "ravdess"
RAVDESS_LABELS: tuple[str, ...] = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
MODALITIES = {"01": "audio-video", "02": "video-only", "03": "audio-only"}
VOCAL_CHANNELS = {"01": "speech", "02": "song"}
INTENSITIES = {"01": "normal", "02": "strong"}
# An audio-only take may also sit in an .mp4 container (audio track only).
_AUDIO_ONLY_EXTENSIONS = frozenset(AUDIO_EXTENSIONS) | {".mp4"}

_NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
_ACTOR_DIR = re.compile(r"^Actor_(\d{2})$")


def parse_name(stem: str) -> dict[str, str]:
    """Decode a RAVDESS stem; ValueError names the first bad field."""
    match = _NAME.match(stem)
    if match is None:
        raise ValueError(f"name {stem!r} does not match MM-VV-EE-II-SS-RR-AA")
    modality, channel, emotion, intensity, statement, repetition, actor = match.groups()
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r} (expected 01, 02 or 03)")
    if channel not in VOCAL_CHANNELS:
        raise ValueError(f"unknown vocal channel {channel!r} (expected 01 speech or 02 song)")
    if not 1 <= int(emotion) <= len(RAVDESS_LABELS):
        raise ValueError(f"unknown emotion {emotion!r} (expected 01-08)")
    if intensity not in INTENSITIES:
        raise ValueError(f"unknown intensity {intensity!r} (expected 01 or 02)")
    if emotion == "01" and intensity == "02":
        raise ValueError("neutral has no strong intensity in RAVDESS")
    if statement not in ("01", "02"):
        raise ValueError(f"unknown statement {statement!r} (expected 01 or 02)")
    if repetition not in ("01", "02"):
        raise ValueError(f"unknown repetition {repetition!r} (expected 01 or 02)")
    if not 1 <= int(actor) <= 24:
        raise ValueError(f"actor {actor!r} outside 01-24")
    return {
        "modality": modality,
        "vocal_channel": VOCAL_CHANNELS[channel],
        "label": RAVDESS_LABELS[int(emotion) - 1],
        "intensity": INTENSITIES[intensity],
        "statement": statement,
        "actor": actor,
        "take": "-".join(match.groups()[1:]),
    }


def _check_file(path: Path, fields: dict[str, str]) -> str | None:
    """The reason this file cannot be used, or None."""
    suffix = path.suffix.lower()
    allowed = _AUDIO_ONLY_EXTENSIONS if fields["modality"] == "03" else VIDEO_EXTENSIONS
    if suffix not in allowed:
        return f"extension {suffix or '(none)'} not usable for modality {fields['modality']} ({MODALITIES[fields['modality']]})"
    folder = _ACTOR_DIR.match(path.parent.name)
    if folder is not None and folder.group(1) != fields["actor"]:
        return f"actor {fields['actor']} in the name but the file is in {path.parent.name}/"
    if path.stat().st_size == 0:
        return "zero-length file"
    return None


def prepare_ravdess(root: str | os.PathLike[str], vocal_channel: Literal["speech", "song", "all"] = "speech") -> RecipeResult:
    """All takes under a RAVDESS root (searched recursively), sorted by clip_id; speaker = actor."""
    if vocal_channel not in ("speech", "song", "all"):
        raise ValueError(f"vocal_channel must be 'speech', 'song' or 'all', got {vocal_channel!r}")
    base = Path(root).expanduser().absolute()
    if not base.is_dir():
        raise FileNotFoundError(f"RAVDESS root {base} is not a directory")
    rejected: list[Rejection] = []
    takes: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    fields_of: dict[str, dict[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                fields = parse_name(path.stem)
            except ValueError as err:
                rejected.append(Rejection(str(path), str(err)))
                continue
            if vocal_channel != "all" and fields["vocal_channel"] != vocal_channel:
                continue
            reason = _check_file(path, fields)
            if reason is not None:
                rejected.append(Rejection(str(path), reason))
                continue
            takes[fields["take"]][fields["modality"]].append(path)
            fields_of[fields["take"]] = fields

    records = []
    for take in sorted(takes):
        video, audio, not_used = _resolve(takes[take])
        fields = fields_of[take]
        records.append(
            ClipRecord(
                clip_id=take,
                dataset=DATASET,
                speaker=fields["actor"],
                label=fields["label"],
                audio_path=str(audio) if audio is not None else None,
                video_path=str(video) if video is not None else None,
                intensity=fields["intensity"],
                sentence=fields["statement"],
            )
        )
        rejected.extend(not_used)
    return RecipeResult(records=records, rejected=sorted(rejected, key=lambda r: r.path))


def _resolve(by_modality: dict[str, list[Path]]) -> tuple[Path | None, Path | None, list[Rejection]]:
    """(video, audio, files not used) for one take, following the module's pairing rule."""
    chosen: dict[str, Path] = {}
    not_used: list[Rejection] = []
    for modality, paths in by_modality.items():
        first, *duplicates = sorted(paths)
        chosen[modality] = first
        not_used.extend(Rejection(str(p), f"duplicate of {first} (same take and modality)") for p in duplicates)
    if "01" in chosen:
        both = chosen["01"]
        not_used.extend(Rejection(str(chosen[m]), f"superseded by the audio-video file {both}") for m in ("02", "03") if m in chosen)
        return both, both, not_used
    return chosen.get("02"), chosen.get("03"), not_used
