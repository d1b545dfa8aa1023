"""FeatureStore: round trips, manifest, atomic commits under failure and kill, concurrency."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from features.clip import ClipFeatures, frames_in_window
from features.config import AudioConfig, FeatureConfig
from features.manifest import ClipRecord
from storage import ConfigMismatchError, FeatureStore, StoreError
from storage.feature_store import CLIPS, STAGING
from storage.store_files import StoreFiles

# pytest resets warning filters per test, undoing the store module's import-time filter.

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = FeatureConfig()
ARRAY_NAMES = ("logmel", "audio_times", "face_crops", "video_times", "face_mask", "face_boxes", "face_landmarks", "face_probs")


def make_features(clip_id: str, n_audio: int | None = 120, n_video: int | None = 75, config: FeatureConfig = CONFIG) -> ClipFeatures:
    """Random but deterministic (seeded by the id) features with contract shapes and dtypes."""
    rng = np.random.default_rng(zlib.crc32(clip_id.encode()))
    side, n_mels = config.face.crop_size, config.audio.n_mels
    feats = ClipFeatures(clip_id=clip_id, duration_s=2.5 + rng.random(), notes=[f"note of {clip_id}", "second"])
    if n_audio is not None:
        feats.logmel = rng.standard_normal((n_audio, n_mels)).astype(np.float32)  # (Ta, F)
        feats.audio_times = (np.arange(n_audio) + 0.5) * config.audio.hop_length_s + rng.random() * 1e-3  # (Ta,)
    if n_video is not None:
        feats.face_crops = rng.integers(0, 256, (n_video, side, side, 3), dtype=np.uint8)  # (Tv, S, S, 3)
        feats.video_times = np.sort(rng.random(n_video)) * 3.0  # (Tv,)
        feats.face_mask = rng.random(n_video) > 0.3
        feats.face_boxes = rng.random((n_video, 4), dtype=np.float32) * 480
        feats.face_landmarks = rng.random((n_video, 5, 2), dtype=np.float32) * 480
        feats.face_probs = rng.random(n_video, dtype=np.float32)
    return feats


def make_record(clip_id: str, **overrides: str | None) -> ClipRecord:
    fields = dict(
        clip_id=clip_id,
        dataset="unit",
        speaker=f"spk{len(clip_id) % 3}",
        label="happy",
        audio_path=f"/media/{clip_id}.wav",
        video_path=f"/media/{clip_id}.mp4",
        intensity="high",
        sentence=None,
    )
    fields.update(overrides)
    return ClipRecord(**fields)


def assert_same(a: ClipFeatures, b: ClipFeatures) -> None:
    assert a.clip_id == b.clip_id and a.duration_s == b.duration_s and a.notes == b.notes
    for name in ARRAY_NAMES:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    return str(tmp_path / "features.zarr")


def test_round_trip_is_exact(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    feats = make_features("clip_a")
    assert store.write(make_record("clip_a"), feats) is True
    back = FeatureStore.open(store_path).read("clip_a")
    assert_same(back, feats)
    assert back.logmel.dtype == np.float32 and back.audio_times.dtype == np.float64
    assert back.face_crops.dtype == np.uint8 and back.face_mask.dtype == np.bool_


@pytest.mark.parametrize("window", [(0.5, 1.2), (0.0, 1e9), (1.0, 1.0), (10.0, 11.0), (-1.0, 0.05)])
def test_a_windowed_read_keeps_exactly_the_frames_a_crop_keeps(store_path: str, window: tuple[float, float]) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    feats, no_audio = make_features("long"), make_features("mute", n_audio=None)
    store.write(make_record("long"), feats)
    store.write(make_record("mute"), no_audio)
    for clip in (feats, no_audio):
        back = store.read(clip.clip_id, window=window)
        assert back.duration_s == clip.duration_s and back.notes == clip.notes  # the whole clip's, not the window's
        for name in ARRAY_NAMES:
            whole = getattr(clip, name)
            if whole is None:
                assert getattr(back, name) is None, name
                continue
            times = clip.audio_times if name in ("logmel", "audio_times") else clip.video_times
            np.testing.assert_array_equal(getattr(back, name), whole[frames_in_window(times, window)], err_msg=name)
    only = store.read("long", skip=("audio_times", "face_boxes"), window=window)  # skipped timestamps still place the rows
    assert only.audio_times is None and only.face_boxes is None
    np.testing.assert_array_equal(only.logmel, feats.logmel[frames_in_window(feats.audio_times, window)])


def test_a_row_is_one_clips_manifest_row(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    store.write(make_record("clip"), make_features("clip"))
    row = store.row("clip")
    assert row["video_path"] == "/media/clip.mp4" and row["n_audio_frames"] == 120
    assert row["clip_id"] == "clip" and row["duration_s"] == store.manifest().set_index("clip_id").loc["clip", "duration_s"]
    with pytest.raises(KeyError, match="nothing"):
        store.row("nothing")


def test_a_window_is_finite_and_in_order(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    store.write(make_record("clip"), make_features("clip"))
    for bad in ((math.nan, 1.0), (-math.inf, 1.0), (2.0, 1.0), (0.5, math.inf), (0.0, math.nan)):
        with pytest.raises(ValueError, match="read window"):
            store.read("clip", window=bad)


def test_write_casts_to_contract_dtypes_and_rejects_bad_features(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    feats = make_features("cast")
    feats.logmel = feats.logmel.astype(np.float64)
    store.write(make_record("cast"), feats)
    assert store.read("cast").logmel.dtype == np.float32

    bad_mels = make_features("bad1", config=replace(CONFIG, audio=AudioConfig(n_mels=64)))
    wrong_len = make_features("bad2")
    wrong_len.video_times = wrong_len.video_times[:-1]
    float_crops = make_features("bad3")
    float_crops.face_crops = float_crops.face_crops.astype(np.float32)
    half_audio = make_features("bad4")
    half_audio.audio_times = None
    for feats in (bad_mels, wrong_len, float_crops, half_audio):
        with pytest.raises(ValueError, match=feats.clip_id):
            store.write(make_record(feats.clip_id), feats)
    with pytest.raises(ValueError, match="other"):
        store.write(make_record("other"), make_features("bad5"))
    with pytest.raises(ValueError, match="not a safe path"):
        store.write(make_record("../escape"), make_features("../escape"))
    assert store.clip_ids() == ["cast"]
    assert os.listdir(Path(store_path) / STAGING) == []


@pytest.mark.parametrize(
    ("n_audio", "n_video"),
    [(120, None), (None, 75), (0, None), (50, 0)],
    ids=["audio-only", "video-only", "empty-audio", "zero-frames-video"],
)
def test_single_modality_and_empty_clips(store_path: str, n_audio: int | None, n_video: int | None) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    feats = make_features("one", n_audio=n_audio, n_video=n_video)
    store.write(make_record("one", video_path=None if n_video is None else "/v.mp4"), feats)
    assert_same(store.read("one"), feats)
    row = store.manifest().iloc[0]
    assert bool(row["has_audio"]) == (n_audio is not None) and bool(row["has_video"]) == (n_video is not None)
    assert row["n_audio_frames"] == (n_audio or 0) and row["n_video_frames"] == (n_video or 0)


def test_manifest_columns_and_values(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    assert store.manifest().empty and "face_ratio" in store.manifest().columns
    written = {cid: make_features(cid, n_video=None if cid == "b_audio" else 60) for cid in ("c_last", "a_first", "b_audio")}
    for cid, feats in written.items():
        store.write(make_record(cid, split="test" if cid == "a_first" else None), feats)
    table = store.manifest()
    record_fields = list(make_record("x").to_dict())
    assert list(table.columns) == record_fields + [
        "has_audio",
        "has_video",
        "n_audio_frames",
        "n_video_frames",
        "duration_s",
        "face_ratio",
        "notes",
        "config_hash",
    ]
    assert table["clip_id"].tolist() == ["a_first", "b_audio", "c_last"]
    for _, row in table.iterrows():
        feats = written[row["clip_id"]]
        assert row["duration_s"] == feats.duration_s
        assert row["face_ratio"] == pytest.approx(feats.face_ratio if feats.has_video else 0.0)
        assert row["notes"] == "; ".join(feats.notes)
        assert row["config_hash"] == CONFIG.config_hash()
        assert row["speaker"] == make_record(row["clip_id"]).speaker
    assert table.set_index("clip_id").loc["a_first", "split"] == "test"
    assert not table.set_index("clip_id").loc["b_audio", "has_video"]


def test_compact_snapshot_and_later_writes(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    for cid in ("x1", "x2", "x3"):
        store.write(make_record(cid), make_features(cid, n_video=8))
    before = store.manifest()
    assert store.compact() == 3
    assert (Path(store_path) / "manifest.parquet").is_file()
    assert FeatureStore.open(store_path).manifest().equals(before)
    store.write(make_record("x0"), make_features("x0", n_video=8))
    assert store.manifest()["clip_id"].tolist() == ["x0", "x1", "x2", "x3"]


def test_rerun_skips_committed_clips(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    first = make_features("same")
    assert store.write(make_record("same"), first) is True
    assert store.has("same") and not store.has("other") and not store.has("../bad")
    again = FeatureStore.create(store_path, CONFIG)
    assert again.write(make_record("same", label="sad"), make_features("same", n_video=3)) is False
    assert_same(again.read("same"), first)
    assert again.manifest()["label"].tolist() == ["happy"]


def test_config_mismatch_is_refused_with_both_hashes(store_path: str) -> None:
    FeatureStore.create(store_path, CONFIG)
    other = replace(CONFIG, audio=AudioConfig(n_mels=64))
    with pytest.raises(ConfigMismatchError) as info:
        FeatureStore.create(store_path, other)
    assert CONFIG.config_hash() in str(info.value) and other.config_hash() in str(info.value)
    assert FeatureStore.open(store_path).config == CONFIG


def test_open_is_read_only(store_path: str) -> None:
    FeatureStore.create(store_path, CONFIG).write(make_record("ro"), make_features("ro"))
    store = FeatureStore.open(store_path)
    assert store.read_only and store.config_hash == CONFIG.config_hash()
    with pytest.raises(StoreError, match="read-only"):
        store.write(make_record("new"), make_features("new"))
    with pytest.raises(StoreError, match="read-only"):
        store.record_failure("new", "/x", "boom")
    with pytest.raises(StoreError, match="read-only"):
        store.compact()
    assert store.clip_ids() == ["ro"]


def test_open_bogus_paths(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a store")
    plain_zarr = tmp_path / "plain.zarr"
    zarr.open_group(str(plain_zarr), mode="w").attrs["something"] = 1
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"123")
    for path in (tmp_path / "missing", empty, foreign, plain_zarr, a_file):
        with pytest.raises(StoreError, match=str(path)):
            FeatureStore.open(path)
    with pytest.raises(StoreError, match="refusing"):
        FeatureStore.create(foreign, CONFIG)
    with pytest.raises(KeyError, match="nope"):
        FeatureStore.create(empty, CONFIG).read("nope")


def test_store_is_a_valid_zarr_hierarchy(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    store.write(make_record("z"), make_features("z", n_video=70))
    root = zarr.open_group(store_path, mode="r")
    attrs = root.attrs["msata_feature_store"]
    assert attrs["config_hash"] == CONFIG.config_hash() and FeatureConfig.from_dict(attrs["feature_config"]) == CONFIG
    assert attrs["format_version"] == CONFIG.format_version
    crops = root[f"{CLIPS}/z/face_crops"]
    assert crops.chunks == (32, CONFIG.face.crop_size, CONFIG.face.crop_size, 3)
    assert crops.compressors and "zstd" in json.dumps(crops.metadata.to_dict()["codecs"])


def test_failures_recorded_and_cleared(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    store.record_failure("flaky", "/media/flaky.flv", "truncated stream")
    store.record_failure("weird name (1)", "/media/weird name (1).mp4", "not parsed")
    store.record_failure("flaky", "/media/flaky.flv", "truncated stream, again")
    store.record_failure("flaky", "/media/flaky.wav", "no audio stream")
    store.record_failure("", "/media/labels.csv:3", "empty label")  # recipe rejections carry no clip id
    store.record_failure("", "/media/labels.csv:4", "empty path")
    table = store.failures()
    assert table["clip_id"].tolist() == ["", "", "flaky", "flaky", "weird name (1)"]
    flaky = table[table["clip_id"] == "flaky"].set_index("path")["reason"].to_dict()
    assert flaky == {"/media/flaky.flv": "truncated stream, again", "/media/flaky.wav": "no audio stream"}
    assert store.write(make_record("flaky"), make_features("flaky"))
    assert FeatureStore.open(store_path).failures()["clip_id"].tolist() == ["", "", "weird name (1)"]


def test_array_write_failing_midway_leaves_nothing(store_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    original = zarr.storage.LocalStore.set
    calls = {"chunks": 0}

    async def failing_set(self, key, value):  # noqa: ANN001
        if "/c/" in key:
            calls["chunks"] += 1
            if calls["chunks"] == 3:
                raise OSError(28, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    feats = make_features("midway", n_video=200)
    with pytest.raises(OSError, match="No space"):
        store.write(make_record("midway"), feats)
    assert calls["chunks"] >= 3
    # zarr's other in-flight chunk writes may still land in the staging dir: only visibility is promised.
    assert not store.has("midway") and store.manifest().empty and store.clip_ids() == []
    assert os.listdir(Path(store_path) / CLIPS) == ["zarr.json"]
    monkeypatch.undo()
    assert store.write(make_record("midway"), feats)
    assert_same(store.read("midway"), feats)


def test_crash_between_move_and_row_is_invisible_and_repaired(store_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    original = StoreFiles.write_file

    def crash_on_row(self, path, data, exclusive=False):  # noqa: ANN001
        if "/manifest/" in path:
            raise KeyboardInterrupt("killed before the manifest row")
        return original(self, path, data, exclusive)

    monkeypatch.setattr(StoreFiles, "write_file", crash_on_row)
    with pytest.raises(KeyboardInterrupt):
        store.write(make_record("orphan"), make_features("orphan", n_video=5))
    assert (Path(store_path) / CLIPS / "orphan").is_dir()  # moved, but not committed
    assert not store.has("orphan") and store.manifest().empty
    with pytest.raises(KeyError):
        store.read("orphan")
    monkeypatch.undo()
    feats = make_features("orphan", n_video=40)
    assert store.write(make_record("orphan"), feats)
    assert_same(store.read("orphan"), feats)


def test_concurrent_threads_in_one_process(store_path: str) -> None:
    store = FeatureStore.create(store_path, CONFIG)
    ids = [f"t{i}" for i in range(6)]
    jobs = [cid for cid in ids for _ in range(2)]  # each clip raced by two threads
    with ThreadPoolExecutor(max_workers=4) as pool:
        written = list(pool.map(lambda cid: store.write(make_record(cid), make_features(cid, n_video=12)), jobs))
    assert sum(written) >= len(ids)
    assert store.manifest()["clip_id"].tolist() == ids
    for cid in ids:
        assert_same(store.read(cid), make_features(cid, n_video=12))
    assert os.listdir(Path(store_path) / STAGING) == []


def test_create_cleans_only_dead_or_stale_staging(store_path: str) -> None:
    FeatureStore.create(store_path, CONFIG)
    staging = Path(store_path) / STAGING
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    host, now = socket.gethostname(), int(time.time())
    entries = {
        f"live~{host}~{os.getpid()}~{now}~aaaa": True,  # this process: a writer still at work
        f"dead~{host}~{finished.stdout.strip()}~{now}~bbbb": False,  # its process is gone
        f"old~elsewhere~1~{now - 7 * 3600}~cccc": False,  # another host, older than stale_after_s
        f"recent~elsewhere~1~{now}~dddd": True,  # another host, recent: cannot tell, keep
        "not-ours": True,
    }
    for name in entries:
        (staging / name / "logmel").mkdir(parents=True)
    FeatureStore.create(store_path, CONFIG)
    assert sorted(os.listdir(staging)) == sorted(name for name, kept in entries.items() if kept)


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import zarr.storage
from test_feature_store import CONFIG, make_features, make_record
from storage import FeatureStore

path, mode, ids = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
if mode == "slow":
    original = zarr.storage.LocalStore.set
    async def slow_set(self, key, value):
        if "/c/" in key:
            time.sleep(0.05)  # blocks the event loop: chunks go one by one, so the kill lands mid-array
        return await original(self, key, value)
    zarr.storage.LocalStore.set = slow_set
store = FeatureStore.create(path, CONFIG)
for clip_id in ids:
    n_video = 640 if mode == "slow" else 16
    store.write(make_record(clip_id), make_features(clip_id, n_video=n_video))
"""


def _spawn(path: str, mode: str, ids: list[str]) -> subprocess.Popen:
    code = _CHILD.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, path, mode, ",".join(ids)], cwd=REPO_ROOT, env=env)


@pytest.mark.slow
def test_sigkilled_writer_leaves_nothing_visible_and_rerun_completes(store_path: str) -> None:
    FeatureStore.create(store_path, CONFIG)
    child = _spawn(store_path, "slow", ["big"])
    staging = Path(store_path) / STAGING
    deadline = time.monotonic() + 120
    while not any(staging.glob("*/face_crops/c/*")):
        assert child.poll() is None, f"writer exited with {child.returncode} before it could be killed"
        assert time.monotonic() < deadline, "writer never started writing crop chunks"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL

    store = FeatureStore.open(store_path)
    assert not store.has("big") and store.manifest().empty and store.clip_ids() == []
    assert not (Path(store_path) / CLIPS / "big").exists()
    assert any(name.startswith("big~") for name in os.listdir(staging))  # the half-written clip, unpublished

    store = FeatureStore.create(store_path, CONFIG)  # cleans leftovers of the dead writer
    assert os.listdir(staging) == []
    feats = make_features("big", n_video=640)
    assert store.write(make_record("big"), feats)
    assert_same(store.read("big"), feats)


@pytest.mark.slow
def test_concurrent_writers_produce_a_complete_manifest(store_path: str) -> None:
    FeatureStore.create(store_path, CONFIG)
    ids = [f"clip{i:02d}" for i in range(8)]
    # Every process writes every clip in its own order, so clips are raced on, not just shared out.
    orders = [list(np.random.default_rng(seed).permutation(ids)) for seed in range(3)]
    children = [_spawn(store_path, "fast", order) for order in orders]
    assert [child.wait(timeout=300) for child in children] == [0, 0, 0]
    store = FeatureStore.open(store_path)
    table = store.manifest()
    assert table["clip_id"].tolist() == ids
    for clip_id in ids:
        assert_same(store.read(clip_id), make_features(clip_id, n_video=16))
    assert os.listdir(Path(store_path) / STAGING) == []
    assert sorted(os.listdir(Path(store_path) / CLIPS)) == sorted(ids + ["zarr.json"])


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path: Path, scheme: str) -> None:
    url = f"memory://msata-test-{uuid.uuid4().hex}/store" if scheme == "memory" else (tmp_path / "s").as_uri()
    try:
        store = FeatureStore.create(url, CONFIG)
        feats = {cid: make_features(cid, n_video=None if cid == "u2" else 40) for cid in ("u1", "u2")}
        for cid, f in feats.items():
            assert store.write(make_record(cid), f)
        assert not store.write(make_record("u1"), feats["u1"])
        store.record_failure("u3", "/media/u3.mp4", "no stream")
        reopened = FeatureStore.open(url)
        for cid, f in feats.items():
            assert_same(reopened.read(cid), f)
        assert reopened.manifest()["clip_id"].tolist() == ["u1", "u2"]
        assert reopened.failures()["clip_id"].tolist() == ["u3"]
        assert store.compact() == 2 and FeatureStore.open(url).manifest()["clip_id"].tolist() == ["u1", "u2"]
        with pytest.raises(ConfigMismatchError):
            FeatureStore.create(url, replace(CONFIG, format_version=CONFIG.format_version + 1))
        fs, root = fsspec.core.url_to_fs(url)
        assert fs.ls(f"{root}/{STAGING}", detail=False) == []
    finally:
        if scheme == "memory":
            fs, root = fsspec.core.url_to_fs(url)
            fs.rm(root.rsplit("/", 1)[0], recursive=True)
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(f"memory://msata-test-{uuid.uuid4().hex}/absent")


def test_a_manifest_snapshot_from_before_a_column_existed_still_reads() -> None:
    import pyarrow as pa

    from storage.manifest_table import MANIFEST_SCHEMA, from_parquet_bytes, to_parquet_bytes

    older_schema = pa.schema([f for f in MANIFEST_SCHEMA if f.name not in ("source_clip_id", "speed")])
    row = {f.name: None for f in older_schema} | {"clip_id": "c1", "speaker": "s1", "label": "sad", "has_audio": True, "n_audio_frames": 5}
    table = from_parquet_bytes(to_parquet_bytes(pa.Table.from_pylist([row], schema=older_schema)), MANIFEST_SCHEMA)
    assert table.schema == MANIFEST_SCHEMA
    assert table.column("source_clip_id").to_pylist() == [None] and table.column("clip_id").to_pylist() == ["c1"]
