"""CREMA-D recipe: ``VideoFlash/*.flv`` + ``AudioWAV/*.wav`` -> ClipRecords.

File names are ``AAAA_SSS_EEE_LL`` (e.g. ``1001_DFA_ANG_XX``): actor 1001-1091,
one of 12 sentence codes, emotion code, emotion level (LO/MD/HI, XX = unspecified).

Join rule (by stem): ``video_path`` is the .flv; ``audio_path`` is the .wav when
there is a usable one (16 kHz PCM, cheaper and cleaner to decode than the flv's
MP3 track), else the .flv itself. A stem with only a .wav is an audio-only clip.
Zero-length files (the official release has a few broken originals) are
rejected with a reason and the other modality, if usable, is still kept.
``AudioMP3/`` is ignored: AudioWAV holds the same recordings.

Label vocabulary: the emotion words RAVDESS uses (angry, disgust, fearful, happy,
neutral, sad), so that the two corpora share names; the class order below is
fixed and never depends on which clips a folder holds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from features.manifest import ClipRecord, RecipeResult, Rejection

DATASET = "crema-d"  # the spelling of features/recipes (CLI value, registry name msata-crema-d)

# Emotion code -> label, in the fixed class order (codes sorted alphabetically).
EMOTIONS: dict[str, str] = {
    "ANG": "angry",
    "DIS": "disgust",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}
CREMA_D_LABELS: tuple[str, ...] = tuple(EMOTIONS.values())
SENTENCES: frozenset[str] = frozenset({"IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI"})
LEVELS: dict[str, str] = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
ACTOR_RANGE = range(1001, 1092)

_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
_FOLDERS = {"VideoFlash": ".flv", "AudioWAV": ".wav"}


def parse_name(stem: str) -> tuple[str, str, str, str]:
    """``1001_DFA_ANG_XX`` -> (actor, sentence, label, level); ValueError says what is wrong."""
    match = _NAME.match(stem)
    if match is None:
        raise ValueError(f"name {stem!r} does not match AAAA_SSS_EEE_LL")
    actor, sentence, emotion, level = match.groups()
    if int(actor) not in ACTOR_RANGE:
        raise ValueError(f"actor {actor} outside 1001-1091")
    if sentence not in SENTENCES:
        raise ValueError(f"unknown sentence code {sentence!r}")
    if emotion not in EMOTIONS:
        raise ValueError(f"unknown emotion code {emotion!r}; expected one of {sorted(EMOTIONS)}")
    if level not in LEVELS:
        raise ValueError(f"unknown emotion level {level!r}; expected one of {sorted(LEVELS)}")
    return actor, sentence, EMOTIONS[emotion], LEVELS[level]


def _scan(folder: Path, extension: str, rejected: list[Rejection]) -> dict[str, Path]:
    """stem -> non-empty file with ``extension``; everything else becomes a rejection."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue  # hidden files (.DS_Store) and sub-folders are not clips
        path = Path(entry.path)
        if path.suffix.lower() != extension:
            rejected.append(Rejection(str(path), f"unexpected extension in {folder.name}/ (expected {extension})"))
            continue
        try:
            parse_name(path.stem)
        except ValueError as err:
            rejected.append(Rejection(str(path), str(err)))
            continue
        if entry.stat().st_size == 0:
            rejected.append(Rejection(str(path), "zero-length file"))
            continue
        found[path.stem] = path
    return found


def prepare_crema_d(root: str | os.PathLike[str]) -> RecipeResult:
    """All clips under a CREMA-D root, sorted by clip_id (= file stem); speaker = actor id."""
    base = Path(root).expanduser().absolute()
    if not any((base / name).is_dir() for name in _FOLDERS):
        raise FileNotFoundError(f"{base} is not a CREMA-D root: neither VideoFlash/ nor AudioWAV/ found")
    rejected: list[Rejection] = []
    videos = _scan(base / "VideoFlash", _FOLDERS["VideoFlash"], rejected)
    audios = _scan(base / "AudioWAV", _FOLDERS["AudioWAV"], rejected)
    records = []
    for stem in sorted(videos.keys() | audios.keys()):
        actor, sentence, label, level = parse_name(stem)
        video = videos.get(stem)
        audio = audios.get(stem, video)
        records.append(
            ClipRecord(
                clip_id=stem,
                dataset=DATASET,
                speaker=actor,
                label=label,
                audio_path=str(audio) if audio is not None else None,
                video_path=str(video) if video is not None else None,
                intensity=level,
                sentence=sentence,
            )
        )
    return RecipeResult(records=records, rejected=sorted(rejected, key=lambda r: r.path))
