"""Ctrl-C or SIGTERM to a running `msata preprocess`: it stops promptly and the store resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from flow_servers import MSATA, REPO, start_prefect_server, stop_all

from features.synthetic import make_synthetic_dataset
from storage import FeatureStore

pytestmark = pytest.mark.slow
N_CLIPS = 4


@pytest.fixture(scope="module")
def slow_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Clips long enough (8 s of 25 fps video, a face per frame) that one takes many seconds to extract."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("raw"), n_speakers=2, clips_per_class=1, classes=("happy", "sad"), duration_s=8.0, size=(320, 240)
    )


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory):
    started: list[subprocess.Popen] = []
    try:
        yield start_prefect_server(tmp_path_factory.mktemp("server"), started)
    finally:
        stop_all(started)


def as_in_a_terminal() -> None:
    """Run in the child before exec: SIGINT and SIGQUIT at their defaults, as for a command a user
    starts in a terminal. A test run started as a background job by a shell without job control
    (`.ci/run &` in a script) has both ignored, POSIX's rule for such jobs; a child inherits that,
    Python then installs no KeyboardInterrupt handler, and msata, rightly, ignores Ctrl-C like any
    program started that way. Without this the ctrl-c case failed in exactly those runs (the CLI
    went on storing clips after SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def committed(store: Path) -> int:
    return len(list((store / "manifest").glob("*.json"))) if (store / "manifest").is_dir() else 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_stop_is_prompt_and_the_store_resumes(server_env: dict, slow_dataset: Path, tmp_path: Path, signum: int) -> None:
    store = tmp_path / "store"
    args = [MSATA, "preprocess", "--dataset", "folder", "--root", str(slow_dataset), "--store", str(store)]
    log = open(tmp_path / "cli.log", "wb")
    proc = subprocess.Popen(
        args, env=server_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=as_in_a_terminal
    )
    try:
        deadline = time.monotonic() + 400
        while committed(store) < 1:
            assert proc.poll() is None, (tmp_path / "cli.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no clip committed within 400 s"
            time.sleep(0.2)
        time.sleep(1.0)  # the next clip is now being extracted
        stopped_at = time.monotonic()
        os.kill(proc.pid, signum)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"msata preprocess still running 30 s after {signal.Signals(signum).name}")
        took = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    output = (tmp_path / "cli.log").read_text(errors="replace")
    kept = committed(store)
    assert kept < N_CLIPS, f"every clip finished before the stop took effect: make the clips longer\n{output[-2000:]}"
    assert took < 10, f"stopping took {took:.1f} s\n{output[-2000:]}"
    assert proc.returncode in (130, 143), output[-2000:]
    assert "stopped" in output and "resume" in output, output[-2000:]
    assert "Traceback" not in output, output[-3000:]

    again = subprocess.run(args, env=server_env | {"COLUMNS": "200"}, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{N_CLIPS - kept} done, {kept} skipped, 0 failed" in again.stdout, again.stdout
    assert len(FeatureStore.open(store).clip_ids()) == N_CLIPS
    assert not any((store / "_staging").iterdir()), list((store / "_staging").iterdir())
