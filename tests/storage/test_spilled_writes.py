"""Writing a long clip whose crops were spilled to disk (a read-only memmap): same stored bytes, a bounded read, atomic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import storage.feature_store as feature_store
from features.clip import ClipFeatures
from features.spill import FrameSpool
from storage import FeatureStore
from storage.feature_store import CLIPS, STAGING

sys.path.insert(0, str(Path(__file__).parent))
from test_feature_store import CONFIG, REPO_ROOT, assert_same, make_features, make_record  # noqa: E402

CROP_BYTES = CONFIG.face.crop_size**2 * 3


def spilled_copy(features: ClipFeatures, directory: str) -> ClipFeatures:
    """The same features with face_crops moved to a spill file, as extraction hands over a long clip."""
    spool = FrameSpool(features.face_crops.shape[1:], np.uint8, limit=0, directory=directory)
    for start in range(0, len(features.face_crops), 7):
        spool.append(features.face_crops[start : start + 7])
    crops = spool.array()
    assert isinstance(crops, np.memmap)
    return ClipFeatures(**{**features.__dict__, "face_crops": crops})


def stored_files(root: Path) -> dict[str, bytes]:
    clips = root / CLIPS
    return {str(p.relative_to(clips)): p.read_bytes() for p in sorted(clips.rglob("*")) if p.is_file()}


def test_spilled_crops_are_stored_byte_for_byte_as_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    features = make_features("long", n_video=300)
    plain = FeatureStore.create(str(tmp_path / "plain.zarr"), CONFIG)
    assert plain.write(make_record("long"), features)

    store = FeatureStore.create(str(tmp_path / "spilled.zarr"), CONFIG)
    spilled = spilled_copy(features, store.spill_dir)
    monkeypatch.setattr(feature_store, "WRITE_SLICE_BYTES", 64 * CROP_BYTES)  # 2 chunks of 32 crops per slice
    written: list[tuple[int, bool]] = []
    original = zarr.Array.__setitem__

    def recording(self, selection, value):  # noqa: ANN001
        if self.name.endswith("face_crops"):
            written.append((np.asarray(value).nbytes, np.shares_memory(value, spilled.face_crops)))
        return original(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", recording)
    assert store.write(make_record("long"), spilled)

    assert len(written) == 5 and max(n for n, _ in written) == 64 * CROP_BYTES  # 300 crops: 4 slices of 64 and one of 44
    assert all(shared for _, shared in written), "the write copied the spilled crops instead of reading them in place"
    assert stored_files(tmp_path / "spilled.zarr") == stored_files(tmp_path / "plain.zarr")
    assert_same(store.read("long"), features)
    assert os.listdir(Path(store.spill_dir)) == []  # the spill file never had a name there


def test_spill_dir_is_the_local_staging_folder_only(tmp_path: Path) -> None:
    store = FeatureStore.create(str(tmp_path / "s.zarr"), CONFIG)
    assert store.spill_dir == str(tmp_path / "s.zarr" / STAGING)
    assert FeatureStore.open(str(tmp_path / "s.zarr")).spill_dir is None  # read-only: never written through
    url = "memory://msata-spill-test/store"
    try:
        assert FeatureStore.create(url, CONFIG).spill_dir is None  # an object store: the system's temporary folder
    finally:
        import fsspec

        fsspec.filesystem("memory").rm("/msata-spill-test", recursive=True)


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import zarr.storage
import storage.feature_store as feature_store
from test_feature_store import CONFIG, make_features, make_record
from test_spilled_writes import CROP_BYTES, spilled_copy
from storage import FeatureStore

original = zarr.storage.LocalStore.set
async def slow_set(self, key, value):
    if "/c/" in key:
        time.sleep(0.05)  # chunks go one by one, so the kill lands mid-array
    return await original(self, key, value)
zarr.storage.LocalStore.set = slow_set
feature_store.WRITE_SLICE_BYTES = 32 * CROP_BYTES
store = FeatureStore.create(sys.argv[1], CONFIG)
store.write(make_record("big"), spilled_copy(make_features("big", n_video=640), store.spill_dir))
"""


@pytest.mark.slow
def test_sigkilled_writer_of_a_spilled_clip_leaves_nothing_visible(tmp_path: Path) -> None:
    store_path = str(tmp_path / "features.zarr")
    FeatureStore.create(store_path, CONFIG)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    code = _CHILD.format(tests=str(Path(__file__).parent))
    child = subprocess.Popen([sys.executable, "-c", code, store_path], cwd=REPO_ROOT, env=env)
    staging = Path(store_path) / STAGING
    deadline = time.monotonic() + 120
    while len(list(staging.glob("*/face_crops/c/*"))) < 3:
        assert child.poll() is None, f"writer exited with {child.returncode} before it could be killed"
        assert time.monotonic() < deadline, "writer never started writing crop chunks"
        time.sleep(0.01)
    with open(f"/proc/{child.pid}/maps") as maps:  # the crops it is writing: mapped from a nameless file in staging
        assert any(str(staging) in line and "(deleted)" in line for line in maps)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL

    store = FeatureStore.open(store_path)
    assert not store.has("big") and store.clip_ids() == [] and store.manifest().empty
    assert not (Path(store_path) / CLIPS / "big").exists()
    assert [n for n in os.listdir(staging) if not n.startswith("big~")] == []  # the spill file never had a name

    store = FeatureStore.create(store_path, CONFIG)  # cleans the dead writer's half-written clip
    assert os.listdir(staging) == []
    features = make_features("big", n_video=640)
    assert store.write(make_record("big"), features)
    assert_same(store.read("big"), features)
