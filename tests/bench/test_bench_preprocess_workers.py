"""The pure helpers of bench/bench_preprocess_workers.py and bench/bench_preprocess.py."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_preprocess_workers import array_differences, build_folder_dataset, parse_proc_stat, process_kind, run_order
from features.clip import ClipFeatures
from features.recipes.folder import prepare_folder


def test_folder_dataset_gives_distinct_clips_the_folder_recipe_accepts(tmp_path):
    sources = []
    for emo in ("ANG", "SAD"):
        src = tmp_path / "src" / f"1001_DFA_{emo}_XX.flv"
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(b"not empty")
        sources.append(src)
    names = build_folder_dataset(sources, 5, tmp_path / "data")
    assert names == [
        "c00_1001_DFA_ANG_XX.flv",
        "c00_1001_DFA_SAD_XX.flv",
        "c01_1001_DFA_ANG_XX.flv",
        "c01_1001_DFA_SAD_XX.flv",
        "c02_1001_DFA_ANG_XX.flv",
    ]
    found = prepare_folder(tmp_path / "data")
    assert not found.rejected
    assert [r.clip_id for r in found.records] == sorted(n[:-4] for n in names)
    assert {(r.label, r.speaker) for r in found.records} == {("ANG", "1001"), ("SAD", "1001")}
    assert (tmp_path / "data" / names[2]).resolve() == sources[0].resolve()


def test_folder_dataset_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="n_clips must be >= 1, got 0"):
        build_folder_dataset([tmp_path / "1001_DFA_ANG_XX.flv"], 0, tmp_path / "d")
    with pytest.raises(ValueError, match="clip.flv: not a CREMA-D name"):
        build_folder_dataset([tmp_path / "clip.flv"], 1, tmp_path / "e")


def test_run_order_alternates():
    assert [run_order([1, 2], r) for r in range(3)] == [[1, 2], [2, 1], [1, 2]]


def test_parse_proc_stat_counts_fields_after_the_command_name():
    # a command name with a space and a ')' inside, as /proc prints it
    line = "4242 (odd ) name) S 17 4242 17 0 -1 4194560 100 0 0 0 250 30 7 3 20 0 1 0 987654 1000000 2500 18446744073709551615"
    assert parse_proc_stat(line) == {"ppid": 17, "self_ticks": 280, "children_ticks": 10, "start": 987654, "rss_pages": 2500}


def test_parse_proc_stat_of_this_process():
    with open("/proc/self/stat") as f:
        stat = parse_proc_stat(f.read())
    import os

    assert stat["ppid"] == os.getppid() and stat["rss_pages"] > 0


@pytest.mark.parametrize(
    ("cmdline", "kind"),
    [
        (["/usr/bin/ffmpeg", "-i", "x"], "ffmpeg"),
        (["python", "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"], "prefect_api"),
        (
            [
                "python",
                "-c",
                "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7)",
                "--multiprocessing-fork",
            ],
            "dask_worker",
        ),
        (["python", "-c", "from multiprocessing.resource_tracker import main;main(4)"], "mp_resource_tracker"),
        (["/repo/.venv/bin/python", "/repo/.venv/bin/msata", "preprocess", "--workers", "2"], "cli"),
        ([], "other"),
    ],
)
def test_process_kind(cmdline, kind):
    assert process_kind(cmdline) == kind


def test_array_differences_sees_values_dtype_and_missing_arrays():
    base = ClipFeatures("c", 1.0, logmel=np.zeros((3, 2), np.float32), face_mask=np.array([True, False]))
    same = ClipFeatures("c", 1.0, logmel=np.zeros((3, 2), np.float32), face_mask=np.array([True, False]))
    assert array_differences(base, same) == {}
    nan = ClipFeatures("c", 1.0, logmel=np.full((3, 2), np.nan, np.float32), face_mask=np.array([True, False]))
    assert array_differences(nan, nan) == {}
    changed = ClipFeatures(
        "c", 1.0, logmel=np.zeros((3, 2), np.float64), face_mask=np.array([True, True]), face_probs=np.ones(2, np.float32)
    )
    assert array_differences(base, changed) == {"face_mask": 1.0, "face_probs": None, "logmel": 0.0}  # logmel: same values, other dtype
    assert array_differences(base, ClipFeatures("c", 2.0, logmel=base.logmel, face_mask=base.face_mask)) == {"duration_s": None}
    off = ClipFeatures("c", 1.0, logmel=np.full((3, 2), 2**-20, np.float32), face_mask=base.face_mask)
    assert array_differences(base, off) == {"logmel": 2**-20}


def test_bench_preprocess_option_helpers():
    from bench.bench_preprocess import frame_size_for_height, loop_group_name, parse_numbers

    assert parse_numbers("5,30, 120", "--loop-seconds") == [5.0, 30.0, 120.0]
    assert parse_numbers("", "--loop-seconds") == []
    with pytest.raises(ValueError, match=r"--heights: 'x' is not a number \(in '720,x'\)"):
        parse_numbers("720,x", "--heights")
    with pytest.raises(ValueError, match="--loop-seconds: '0' must be > 0"):
        parse_numbers("0", "--loop-seconds")
    assert [frame_size_for_height(h) for h in (1080, 720, 480)] == [(1920, 1080), (1280, 720), (854, 480)]
    with pytest.raises(ValueError, match="even number >= 2, got 721"):
        frame_size_for_height(721)
    assert loop_group_name(1080, 5.0) == "loop1080_5s" and loop_group_name(720, 2.5) == "loop720_2.5s"
