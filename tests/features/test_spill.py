"""Long clips: crops past the spill bound go to a nameless file; the features are the same, nothing is left behind."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from features import spill
from features.config import FaceConfig, FeatureConfig
from features.decode import iter_video_frames
from features.extract import extract_clip
from features.faces import FaceDetector
from features.manifest import ClipRecord
from features.spill import FrameSpool
from features.synthetic import SyntheticClip

SHAPE = (4, 4, 3)


def blocks(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(k), *SHAPE), dtype=np.uint8) for k in rng.integers(1, 5, n)]


def open_in(directory: Path) -> list[str]:
    """What this process still holds of files in ``directory``: descriptors and memory maps."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            held.append(f"fd {fd}: {target}")
    with open("/proc/self/maps") as maps:
        held += [line.strip() for line in maps if str(directory) in line]
    return held


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="checks descriptors through /proc (Linux)")


def test_below_the_bound_nothing_changes(tmp_path: Path) -> None:
    parts = blocks(10)
    spool = FrameSpool(SHAPE, np.uint8, limit=10**6, directory=str(tmp_path))
    for part in parts:
        spool.append(part)
    out = spool.array()
    assert type(out) is np.ndarray and not spool.spilled and len(spool) == len(out)
    np.testing.assert_array_equal(out, np.concatenate(parts))
    assert os.listdir(tmp_path) == [] and open_in(tmp_path) == []


def test_past_the_bound_a_read_only_memmap_of_a_nameless_file(tmp_path: Path) -> None:
    parts = blocks(40, seed=1)
    spool = FrameSpool(SHAPE, np.uint8, limit=5 * parts[0][:1].nbytes, directory=str(tmp_path))
    for i, part in enumerate(parts):
        spool.append(part)
        assert os.listdir(tmp_path) == []  # never a name to clean up, not even while writing
        assert spool.spilled == (sum(p.nbytes for p in parts[: i + 1]) > spool.limit)
    assert len(open_in(tmp_path)) == 1  # the file's descriptor, while appending
    out = spool.array()
    assert isinstance(out, np.memmap) and not out.flags.writeable
    np.testing.assert_array_equal(out, np.concatenate(parts))
    assert open_in(tmp_path)  # the mapping (and Python's mmap keeps its own duplicate of the descriptor)
    del out
    gc.collect()
    assert open_in(tmp_path) == [] and os.listdir(tmp_path) == []


def test_close_drops_the_file_and_refuses_more(tmp_path: Path) -> None:
    spool = FrameSpool(SHAPE, np.uint8, limit=0, directory=str(tmp_path))
    spool.append(blocks(1)[0])
    assert spool.spilled and open_in(tmp_path)
    spool.close()
    assert open_in(tmp_path) == []
    with pytest.raises(RuntimeError, match="after array"):
        spool.append(blocks(1)[0])
    spool.close()  # idempotent


def test_bad_blocks_and_bounds_are_refused() -> None:
    spool = FrameSpool(SHAPE, np.uint8)
    with pytest.raises(ValueError, match=r"\(4, 4, 3\) uint8 frames got a block \(2, 4, 4\) uint8"):
        spool.append(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        spool.append(np.zeros((2, *SHAPE), np.float32))
    with pytest.raises(ValueError, match="-1"):
        FrameSpool(SHAPE, np.uint8, limit=-1)
    assert spool.array().shape == (0, *SHAPE)
    with pytest.raises(RuntimeError, match="twice"):
        spool.array()


@pytest.fixture(scope="module")
def talking(make_clip: Callable[..., SyntheticClip]) -> SyntheticClip:
    return make_clip("spill.mp4", duration_s=1.2, fps="30", width=160, height=120, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("search", ["full", "track"])
def test_a_spilled_track_is_the_in_memory_track(
    talking: SyntheticClip, search: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    detector = FaceDetector(FaceConfig(search=search))
    in_memory = detector.track(iter_video_frames(talking.path, chunk=8), spill_dir=str(tmp_path))
    monkeypatch.setattr(spill, "SPILL_BYTES", 3 * 96 * 96 * 3)  # past the third crop
    spilled = detector.track(iter_video_frames(talking.path, chunk=8), spill_dir=str(tmp_path))
    assert type(in_memory.crops) is np.ndarray and isinstance(spilled.crops, np.memmap)
    assert len(spilled.times) == 36 and spilled.mask.any()
    for name in ("crops", "times", "mask", "boxes", "landmarks", "probs"):
        a, b = getattr(in_memory, name), getattr(spilled, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert in_memory.n_detected == spilled.n_detected
    del spilled
    gc.collect()
    assert open_in(tmp_path) == [] and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_failure_mid_clip_leaves_no_spill_file(talking: SyntheticClip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    held: list[list[str]] = []

    def breaking(chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, chunk in enumerate(chunks):
            if i == 2:
                held.append(open_in(tmp_path))  # the spill file, open while the clip is under way
                raise OSError(5, "Input/output error (the disk went away mid-clip)")
            yield chunk

    detector = FaceDetector(FaceConfig(search="track"))
    with pytest.raises(OSError, match="mid-clip"):
        detector.track(breaking(iter_video_frames(talking.path, chunk=8)), spill_dir=str(tmp_path))
    assert held and held[0], "the clip had not spilled yet when it failed: the test proves nothing"
    assert open_in(tmp_path) == [] and os.listdir(tmp_path) == []  # closed at once, not when the traceback goes


@pytest.mark.slow
def test_extract_clip_spills_into_the_given_folder(talking: SyntheticClip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = replace(FeatureConfig(), face=FaceConfig(search="track"))
    record = ClipRecord("spill", "unit", "s", "happy", str(talking.path), str(talking.path))
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    features = extract_clip(record, config, spill_dir=str(tmp_path))
    assert isinstance(features.face_crops, np.memmap) and open_in(tmp_path)
    monkeypatch.undo()
    again = extract_clip(record, config, spill_dir=str(tmp_path))
    assert type(again.face_crops) is np.ndarray
    np.testing.assert_array_equal(features.face_crops, again.face_crops)
    del features
    gc.collect()
    assert open_in(tmp_path) == []


def test_whisper_states_spill_to_the_same_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from features.audio_encoders.stage import encode_wave
    from features.config import AudioEncoderConfig

    config = AudioEncoderConfig(name="whisper-tiny.en", layers=(0, 4), window_s=2.0)
    wave = (0.1 * np.random.default_rng(4).standard_normal(16_000 * 5 + 500)).astype(np.float32)
    in_memory, times = encode_wave(wave, config, "cpu", spill_dir=str(tmp_path))
    monkeypatch.setattr(spill, "SPILL_BYTES", 150 * 2 * 384 * 2)  # past the second 2-s window (100 frames each)
    spilled, spilled_times = encode_wave(wave, config, "cpu", spill_dir=str(tmp_path))
    assert type(in_memory) is np.ndarray and isinstance(spilled, np.memmap) and spilled.shape == (252, 2, 384)
    assert spilled.dtype == in_memory.dtype and np.array_equal(spilled, in_memory) and np.array_equal(spilled_times, times)
    assert os.listdir(tmp_path) == []
    del spilled
    gc.collect()
    assert open_in(tmp_path) == []
