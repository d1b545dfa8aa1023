"""Dataset recipes on synthetic file trees (names and sizes only) and on the real shared data."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from features.manifest import ClipRecord, RecipeResult
from features.recipes.crema_d import CREMA_D_LABELS, prepare_crema_d
from features.recipes.folder import MAX_ID_LENGTH, clip_id_for, prepare_folder
from features.recipes.ravdess import RAVDESS_LABELS, prepare_ravdess
from storage.manifest_table import SAFE_ID


def touch(root: Path, relative: str, size: int = 16) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


def by_id(result: RecipeResult) -> dict[str, ClipRecord]:
    return {r.clip_id: r for r in result.records}


def assert_well_formed(result: RecipeResult) -> None:
    ids = [r.clip_id for r in result.records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(SAFE_ID.match(cid) for cid in ids), [cid for cid in ids if not SAFE_ID.match(cid)]
    assert all(r.audio_path or r.video_path for r in result.records)


# ----------------------------------------------------------------------------- CREMA-D
def test_crema_d_join_rules_and_rejections(tmp_path: Path) -> None:
    for name in ("1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1004_ITS_NEU_XX", "1005_WSI_DIS_XX"):
        touch(tmp_path, f"VideoFlash/{name}.flv")
    touch(tmp_path, "VideoFlash/1003_TIE_SAD_LO.flv", size=0)  # broken original, its wav is fine
    for name in ("1001_DFA_ANG_XX", "1002_MTI_FEA_MD", "1003_TIE_SAD_LO"):
        touch(tmp_path, f"AudioWAV/{name}.wav")
    touch(tmp_path, "AudioWAV/1005_WSI_DIS_XX.wav", size=0)  # broken wav, the flv still has audio
    bad = {
        "AudioWAV/1000_DFA_ANG_XX.wav": "actor",
        "AudioWAV/1001_XYZ_ANG_XX.wav": "sentence",
        "AudioWAV/1001_DFA_SUR_XX.wav": "emotion",
        "AudioWAV/1001_DFA_ANG_ZZ.wav": "level",
        "AudioWAV/1001_DFA_ANG.wav": "does not match",
        "AudioWAV/notes.txt": "extension",
        "VideoFlash/1001_DFA_HAP_XX.mp4": "extension",
    }
    for name in bad:
        touch(tmp_path, name)
    touch(tmp_path, "AudioWAV/.DS_Store")
    touch(tmp_path, "AudioMP3/1002_MTI_FEA_MD.mp3")

    result = prepare_crema_d(tmp_path)
    assert_well_formed(result)
    clips = by_id(result)
    assert sorted(clips) == [
        "1001_DFA_ANG_XX",
        "1001_IEO_HAP_HI",
        "1002_MTI_FEA_MD",
        "1003_TIE_SAD_LO",
        "1004_ITS_NEU_XX",
        "1005_WSI_DIS_XX",
    ]
    both = clips["1001_DFA_ANG_XX"]
    assert both.audio_path == str(tmp_path / "AudioWAV/1001_DFA_ANG_XX.wav")
    assert both.video_path == str(tmp_path / "VideoFlash/1001_DFA_ANG_XX.flv")
    assert (both.dataset, both.speaker, both.label, both.sentence, both.intensity) == ("crema-d", "1001", "angry", "DFA", "unspecified")
    assert clips["1001_IEO_HAP_HI"].audio_path == clips["1001_IEO_HAP_HI"].video_path  # no wav: audio from the flv
    assert clips["1001_IEO_HAP_HI"].intensity == "high"
    assert clips["1002_MTI_FEA_MD"].video_path is None and clips["1002_MTI_FEA_MD"].label == "fearful"
    assert clips["1003_TIE_SAD_LO"].video_path is None and clips["1003_TIE_SAD_LO"].audio_path.endswith(".wav")
    assert clips["1005_WSI_DIS_XX"].audio_path.endswith(".flv")

    got = {r.path: r.reason for r in result.rejected}
    assert got.pop(str(tmp_path / "VideoFlash/1003_TIE_SAD_LO.flv")) == "zero-length file"
    assert got.pop(str(tmp_path / "AudioWAV/1005_WSI_DIS_XX.wav")) == "zero-length file"
    assert sorted(got) == sorted(str(tmp_path / n) for n in bad)
    for name, word in bad.items():
        assert word in got[str(tmp_path / name)], (name, got[str(tmp_path / name)])


def test_crema_d_labels_and_missing_root(tmp_path: Path) -> None:
    assert CREMA_D_LABELS == ("angry", "disgust", "fearful", "happy", "neutral", "sad")
    with pytest.raises(FileNotFoundError, match="VideoFlash"):
        prepare_crema_d(tmp_path)


def test_crema_d_real_sample(shared_data: Path) -> None:
    result = prepare_crema_d(shared_data / "crema_d_sample")
    assert_well_formed(result)
    assert result.rejected == []
    speakers = Counter(r.speaker for r in result.records)
    assert speakers == {"1001": 6, "1002": 6}
    for record in result.records:
        assert record.audio_path.endswith(f"AudioWAV/{record.clip_id}.wav")
        if record.speaker == "1001":
            assert record.video_path.endswith(f"VideoFlash/{record.clip_id}.flv")
        else:
            assert record.video_path is None
    assert {r.label for r in result.records} == set(CREMA_D_LABELS)


# ----------------------------------------------------------------------------- RAVDESS
def test_ravdess_pairing_and_rejections(tmp_path: Path) -> None:
    files = [
        "Actor_01/03-01-05-02-01-01-01.wav",  # audio-only take
        "Actor_01/01-01-03-01-01-01-01.mp4",  # audio-video take ...
        "Actor_01/02-01-03-01-01-01-01.mp4",  # ... superseding its video-only
        "Actor_01/03-01-03-01-01-01-01.wav",  # ... and audio-only files
        "Actor_02/02-01-04-02-02-02-02.mp4",  # video-only + audio-only of one take: paired
        "Actor_02/03-01-04-02-02-02-02.flac",
        "Actor_02/02-01-06-01-01-01-02.mp4",  # video-only take
        "Actor_01/03-01-08-01-01-01-01.flac",  # duplicate take: .flac sorts first and wins
        "Actor_01/03-01-08-01-01-01-01.wav",
        "Actor_01/03-02-03-01-01-01-01.wav",  # song
        "extra/nested/Actor_03/03-01-02-02-01-02-03.mp3",  # recursive search
    ]
    for name in files:
        touch(tmp_path, name)
    bad = {
        "Actor_01/04-01-01-01-01-01-01.wav": "modality",
        "Actor_01/03-01-09-01-01-01-01.wav": "emotion",
        "Actor_01/03-01-01-02-01-01-01.wav": "neutral",
        "Actor_01/03-01-01-01-03-01-01.wav": "statement",
        "Actor_01/03-01-02-01-01-01-25.wav": "actor",
        "Actor_01/03-01-02-01-01-01-03.wav": "Actor_01",  # name says actor 03
        "Actor_01/01-01-02-01-01-01-01.wav": "extension",  # audio-video needs a video container
        "Actor_01/readme.txt": "does not match",
    }
    for name in bad:
        touch(tmp_path, name)
    touch(tmp_path, "Actor_01/03-01-07-01-01-01-01.wav", size=0)

    result = prepare_ravdess(tmp_path)
    assert_well_formed(result)
    clips = by_id(result)
    assert sorted(clips) == [
        "01-02-02-01-02-03",
        "01-03-01-01-01-01",
        "01-04-02-02-02-02",
        "01-05-02-01-01-01",
        "01-06-01-01-01-02",
        "01-08-01-01-01-01",
    ]
    av = clips["01-03-01-01-01-01"]
    assert av.audio_path == av.video_path == str(tmp_path / "Actor_01/01-01-03-01-01-01-01.mp4")
    assert (av.dataset, av.speaker, av.label, av.intensity, av.sentence) == ("ravdess", "01", "happy", "normal", "01")
    paired = clips["01-04-02-02-02-02"]
    assert paired.video_path.endswith("02-01-04-02-02-02-02.mp4") and paired.audio_path.endswith("03-01-04-02-02-02-02.flac")
    assert (paired.label, paired.intensity, paired.sentence, paired.speaker) == ("sad", "strong", "02", "02")
    assert clips["01-06-01-01-01-02"].audio_path is None and clips["01-05-02-01-01-01"].video_path is None
    assert clips["01-08-01-01-01-01"].audio_path.endswith(".flac") and clips["01-08-01-01-01-01"].label == "surprised"
    assert clips["01-02-02-01-02-03"].speaker == "03"

    got = {r.path: r.reason for r in result.rejected}
    for name in ("Actor_01/02-01-03-01-01-01-01.mp4", "Actor_01/03-01-03-01-01-01-01.wav"):
        assert "superseded" in got.pop(str(tmp_path / name))
    assert "duplicate" in got.pop(str(tmp_path / "Actor_01/03-01-08-01-01-01-01.wav"))
    assert got.pop(str(tmp_path / "Actor_01/03-01-07-01-01-01-01.wav")) == "zero-length file"
    assert sorted(got) == sorted(str(tmp_path / n) for n in bad)
    for name, word in bad.items():
        assert word in got[str(tmp_path / name)], (name, got[str(tmp_path / name)])


def test_ravdess_vocal_channel_filter(tmp_path: Path) -> None:
    touch(tmp_path, "Actor_01/03-01-03-01-01-01-01.wav")
    touch(tmp_path, "Actor_01/03-02-03-01-01-01-01.wav")
    assert [r.clip_id for r in prepare_ravdess(tmp_path).records] == ["01-03-01-01-01-01"]
    assert [r.clip_id for r in prepare_ravdess(tmp_path, vocal_channel="song").records] == ["02-03-01-01-01-01"]
    assert len(prepare_ravdess(tmp_path, vocal_channel="all").records) == 2
    with pytest.raises(ValueError, match="vocal_channel"):
        prepare_ravdess(tmp_path, vocal_channel="choir")  # type: ignore[arg-type]
    assert RAVDESS_LABELS == ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")


def test_ravdess_real_speech(shared_data: Path) -> None:
    result = prepare_ravdess(shared_data / "ravdess_speech_16k")
    assert_well_formed(result)
    assert result.rejected == []
    assert len(result.records) == 1200
    assert all(r.video_path is None and r.audio_path.endswith(".flac") for r in result.records)
    speakers = Counter(r.speaker for r in result.records)
    assert len(speakers) == 20 and set(speakers.values()) == {60}
    labels = Counter(r.label for r in result.records)
    # 20 actors x 2 statements x 2 repetitions, times 2 intensities except for neutral.
    assert labels == {label: 80 if label == "neutral" else 160 for label in RAVDESS_LABELS}


# ----------------------------------------------------------------------------- folder
def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_folder_recipe(tmp_path: Path) -> None:
    for name in ("a.mp4", "a.wav", "Bob/take 1.mkv", "x.flac", "doc.txt", "s.ogg", "t.webm"):
        touch(tmp_path, name)
    touch(tmp_path, "empty.wav", size=0)
    write_csv(
        tmp_path / "labels.csv",
        [
            "path, label ,speaker,split",
            "a.mp4,happy,s1,train",
            "a.wav,sad,s2,",
            "Bob\\take 1.mkv, angry ,s1,Validation",
            "x.flac,,s3,",  # empty label
            "x.flac,calm,s3,test",
            "x.flac,calm,s3,test",  # listed twice
            "missing.mp4,happy,s1,",
            "empty.wav,happy,s1,",
            "doc.txt,happy,s1,",
            "../outside.mp4,happy,s1,",
            "/abs/clip.mp4,happy,s1,",
            ",happy,s1,",
            "s.ogg,happy,,",  # empty speaker
            "t.webm,happy,s1,holdout",
            "s.ogg,happy,s1,train,surplus",
        ],
    )
    result = prepare_folder(tmp_path)
    assert_well_formed(result)
    clips = by_id(result)
    digest = lambda rel: hashlib.sha1(rel.encode()).hexdigest()[:8]  # noqa: E731
    assert sorted(clips) == sorted([f"a-{digest('a.mp4')}", f"a-{digest('a.wav')}", "Bob__take_1", "x"])
    video = clips[f"a-{digest('a.mp4')}"]
    assert video.audio_path == video.video_path == str(tmp_path / "a.mp4")
    assert (video.dataset, video.label, video.speaker, video.split) == ("folder", "happy", "s1", "train")
    audio = clips[f"a-{digest('a.wav')}"]
    assert audio.video_path is None and audio.split is None
    assert clips["Bob__take_1"].label == "angry" and clips["Bob__take_1"].split == "val"
    assert clips["Bob__take_1"].video_path == str(tmp_path / "Bob/take 1.mkv")
    assert clips["x"].split == "test"

    got = [r.reason for r in result.rejected]
    assert len(got) == 11
    for expected in (
        "empty label",
        "listed twice",
        "file not found",
        "zero-length",
        "not a known media type",
        "leaves the folder",
        "absolute path",
        "empty path",
        "empty speaker",
        "unknown split",
        "fields",
    ):
        assert sum(expected in reason for reason in got) == 1, (expected, got)
    assert all(str(tmp_path) in r.path for r in result.rejected)


def test_folder_csv_errors_and_custom_csv(tmp_path: Path) -> None:
    media = tmp_path / "media"
    touch(media, "clip.wav")
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        prepare_folder(media)
    with pytest.raises(ValueError, match="speaker"):
        prepare_folder(media, write_csv(tmp_path / "bad.csv", ["path,label", "clip.wav,happy"]))
    result = prepare_folder(media, write_csv(tmp_path / "elsewhere.csv", ["path,label,speaker", "clip.wav,happy,s9"]))
    assert [(r.clip_id, r.speaker, r.split, r.video_path) for r in result.records] == [("clip", "s9", None, None)]


def test_clip_id_for_is_path_safe() -> None:
    assert clip_id_for("dir/sub/My Clip (2).mp4") == "dir__sub__My_Clip__2_"
    assert clip_id_for(".hidden.wav") == "_hidden"
    long_a, long_b = "d/" + "a" * 300 + "1.mp4", "d/" + "a" * 300 + "2.mp4"
    assert len(clip_id_for(long_a)) <= MAX_ID_LENGTH and clip_id_for(long_a) != clip_id_for(long_b)
    for rel in ("dir/sub/My Clip (2).mp4", ".hidden.wav", long_a, "ünïcode/ß.mp4"):
        assert SAFE_ID.match(clip_id_for(rel)), rel
