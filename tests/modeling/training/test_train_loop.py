"""The training loop: schedule, early stopping, checkpoints, and a real kill-and-resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from training_fixtures import build_tiny_store, tiny_loaders, tiny_meta, tiny_model

from modeling.training.checkpoint import load_checkpoint
from modeling.training.train_loop import TrainConfig, train_model, warmup_cosine

TESTS_DIR = Path(__file__).resolve().parents[2]
REPO = TESTS_DIR.parent
FAST = dict(batch_size=4, lr=3e-3, warmup_epochs=0.5, weight_decay=0.0, num_workers=0, max_duration_s=1.5, lambda_ctm=0.1)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("store") / "tiny"
    build_tiny_store(path, n_speakers=6, clips_per_speaker=4)
    return str(path)


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(2, 12))


def test_config_round_trip_and_unknown_keys() -> None:
    cfg = TrainConfig(epochs=3, lr=1e-3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


@pytest.mark.slow
def test_train_checkpoints_and_learns(store_path: str, tmp_path) -> None:
    train, val = tiny_loaders(store_path)
    events = []
    cfg = TrainConfig(epochs=3, patience=10, **FAST)
    result = train_model(tiny_model(), train, val, cfg, tmp_path, tiny_meta(), progress=events.append)
    assert [r.epoch for r in result.history] == [1, 2, 3] and result.epochs_run == 3
    assert result.history[-1].train_ce < result.history[0].train_ce  # it learns something
    assert all(r.train_clips_per_s > 0 and 0.0 <= r.data_wait_share < 1.0 for r in result.history)
    best = load_checkpoint(result.best_path, require_resume=True)
    last = load_checkpoint(result.last_path, require_resume=True)
    assert last["epoch"] == 3
    uars = [r.val_uar for r in result.history]
    assert best["epoch"] == result.best_epoch == 1 + uars.index(max(uars))  # first epoch reaching the max
    assert best["best_metric"] == max(uars) and best["label_names"] == tiny_meta()["label_names"]
    kinds = [e.kind for e in events]
    assert kinds.count("epoch_end") == 3 and kinds.count("step") == 3 * len(train)


@pytest.mark.slow
def test_early_stopping_on_validation_uar(store_path: str, tmp_path) -> None:
    train, val = tiny_loaders(store_path)
    cfg = TrainConfig(epochs=6, patience=2, **(FAST | {"lr": 0.0}))  # no learning: UAR never improves after epoch 1
    result = train_model(tiny_model(), train, val, cfg, tmp_path, tiny_meta())
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    # resuming a stopped run does nothing more
    again = train_model(tiny_model(), train, val, cfg, tmp_path, tiny_meta(), resume=True)
    assert again.epochs_run == 3 and len(again.history) == 3


@pytest.mark.slow
def test_refit_without_validation_follows_the_first_schedule_and_stops_at_the_chosen_epoch(store_path: str, tmp_path) -> None:
    train, val = tiny_loaders(store_path)
    cfg = TrainConfig(epochs=4, patience=10, **FAST)
    first = train_model(tiny_model(), train, val, cfg, tmp_path / "first", tiny_meta())
    refit = train_model(tiny_model(), train, None, cfg, tmp_path / "refit", tiny_meta(), stop_after_epoch=2)
    assert [r.epoch for r in refit.history] == [1, 2] and refit.best_epoch == 2 and not refit.stopped_early
    assert all(r.val_uar != r.val_uar for r in refit.history)  # NaN: a refit has no validation speakers
    # the same schedule as the first run's (cosine over 4 epochs), cut after epoch 2, and the same weights up to there
    assert [r.lr for r in refit.history] == pytest.approx([r.lr for r in first.history[:2]])
    assert refit.history[1].train_loss == pytest.approx(first.history[1].train_loss, rel=1e-5)
    best = load_checkpoint(refit.best_path, require_resume=True)
    assert best["epoch"] == 2
    # resuming a finished refit trains nothing more
    again = train_model(tiny_model(), train, None, cfg, tmp_path / "refit", tiny_meta(), resume=True, stop_after_epoch=2)
    assert again.epochs_run == 2 and len(again.history) == 2
    with pytest.raises(ValueError, match="stop_after_epoch"):
        train_model(tiny_model(), train, None, cfg, tmp_path / "bad", tiny_meta())


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    from modeling.training.train_loop import TrainConfig, train_model
    from training_fixtures import tiny_loaders, tiny_meta, tiny_model

    out, resume, slow = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
    train, val = tiny_loaders({store!r})
    model = tiny_model(0)
    cfg = TrainConfig(epochs=3, patience=10, **{fast!r})
    def progress(event):
        if slow and event.kind == "epoch_end":
            time.sleep(30)  # the test kills us while we sit here, after the checkpoint
    result = train_model(model, train, val, cfg, out, tiny_meta(), resume=resume, progress=progress)
    print("EPOCHS", [r.epoch for r in result.history])
    """
)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_uninterrupted_run(store_path: str, tmp_path) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(RESUME_SCRIPT.format(repo=str(REPO), tests=str(TESTS_DIR), store=store_path, fast=FAST))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"

    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed_dir), "0", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    while not (killed_dir / "last.pt").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(killed_dir / "last.pt")["epoch"] == 1

    resumed = subprocess.run([sys.executable, str(script), str(killed_dir), "1", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "EPOCHS [1, 2, 3]" in resumed.stdout  # history continues from the checkpoint
    full = subprocess.run([sys.executable, str(script), str(full_dir), "0", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    a, b = load_checkpoint(killed_dir / "last.pt"), load_checkpoint(full_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for name, tensor in b["state_dict"].items():
        assert torch.allclose(a["state_dict"][name], tensor, atol=1e-6), name
    assert a["history"][-1]["val_uar"] == b["history"][-1]["val_uar"]
    assert a["history"][1]["train_loss"] == pytest.approx(b["history"][1]["train_loss"], rel=1e-6)
