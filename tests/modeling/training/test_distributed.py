"""Data-parallel training for real: torchrun, 2 gloo processes on CPU, against 1 process.

What must agree. ``batch_size`` is the global batch and the ranks' gradients are
summed, so 2 processes take the optimiser steps 1 process takes. The CE term is a
mean over clips and splits exactly; the CTM term is a mean over *tokens* of the batch
(modeling/network/losses.py), which a per-rank loss cannot reproduce (each rank averages over
its own tokens), so these runs set lambda_ctm = 0 to compare like with like. What is
left is float summation order (a batch of 4 against 2 + 2 summed by all-reduce, other
padding lengths): relative differences of ~1e-7 per step, which AdamW carries through
2 epochs as ~1e-6 in the weights. The bound 1e-4 leaves two orders of magnitude and is
far below what a wrong shard (a clip seen twice or missed, a wrong loss weight, one
rank's gradient only) moves the weights: those change them by ~1e-3 or more.

One parameter is left out of the weight comparison: the tiny model's first video
convolution has 8 channels followed by GroupNorm(8, 8), one channel per group, which
subtracts each channel's mean and so cancels that convolution's bias exactly. Its
gradient is zero up to rounding (~1e-9), AdamW divides it by its own root mean square
and moves the bias by up to lr per step in a direction set by rounding: 1 and 2
processes (other rounding) end 4e-3 apart on it (measured), with no effect on any
output (the predicted probabilities, compared below, agree to 1e-7).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from training_fixtures import TINY_MODEL, build_tiny_store

from modeling.training.checkpoint import load_checkpoint

TESTS_DIR = Path(__file__).resolve().parents[2]
REPO = TESTS_DIR.parent
CONFIG = dict(batch_size=4, lr=3e-3, warmup_epochs=1.0, weight_decay=0.01, num_workers=0, max_duration_s=1.5, lambda_ctm=0.0, patience=10)
WEIGHT_ATOL = 1e-4
CANCELLED = {"video_frontend.cnn.0.bias"}  # see the module docstring

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path[:0] = [{repo!r}, {tests!r}]
    from modeling.training import distributed as dist
    from modeling.network.encoder import MsataConfig, MsataModel
    from modeling.training.train_loop import TrainConfig, predict, train_model
    from training_fixtures import tiny_loaders, tiny_meta

    out, epochs, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    model_overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {{}}
    train_overrides = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {{}}
    ctx = dist.context_from_env()
    dist.start(ctx, torch.device("cpu"))
    train, val = tiny_loaders({store!r}, rank=ctx.rank, world_size=ctx.world_size)
    torch.manual_seed(0)
    meta = tiny_meta()
    meta["model_config"] = {{**meta["model_config"], **model_overrides}}
    model = MsataModel(MsataConfig.from_dict(meta["model_config"]))
    cfg = TrainConfig(epochs=epochs, **{{**{config!r}, **train_overrides}})
    result = train_model(model, train, val, cfg, out, meta, resume=resume, ctx=ctx)
    buffers = {{k: v for k, v in model.state_dict().items() if "running_" in k}}  # BatchNorm statistics, if any
    torch.save(buffers, f"{{out}}/running-stats-rank{{ctx.rank}}.pt")
    y, probs, ids, loss = predict(model, val, torch.device("cpu"), ctx)
    if ctx.is_main:
        with open(out + "/summary.json", "w") as f:
            json.dump({{"history": [r.__dict__ for r in result.history], "ids": ids, "labels": y.tolist(), "probs": probs.tolist(), "world": ctx.world_size}}, f)
    dist.stop(ctx)
    """
)


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    build_tiny_store(root / "store", n_speakers=6, clips_per_speaker=4)  # 16 training clips (4 steps of 4), 8 validation clips
    path = root / "ddp_script.py"
    path.write_text(SCRIPT.format(repo=str(REPO), tests=str(TESTS_DIR), store=str(root / "store"), config=CONFIG))
    return path


# A run is seconds of training; the rest is starting processes (torchrun's agent and each rank
# import torch, then the ranks meet), which on a 2-core machine shared with other training runs
# has taken long enough to pass the former bound of 300 s. The bound only ends a run that hangs.
# (The port: --standalone binds the agent's store on port 0, the OS's pick, and the ranks meet
# through it; no port is chosen here, so none can be taken between choosing and binding.)
RUN_TIMEOUT_S = 1200


def run(
    script: Path, out: Path, nproc: int, epochs: int, resume: bool = False, model: dict | None = None, train: dict | None = None
) -> dict:
    args = [str(out), str(epochs), "1" if resume else "0", json.dumps(model or {}), json.dumps(train or {})]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | {
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
    }
    # Its own process group: a run that times out is ended with its ranks, not just torchrun's
    # agent (orphaned ranks would load the CPU under the next runs, and hold the pipes open).
    proc = subprocess.Popen(
        [*launcher, str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except BaseException as err:  # a hang (or Ctrl-C): the run ends with its ranks
        with contextlib.suppress(ProcessLookupError):  # all of it already gone
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        if not isinstance(err, subprocess.TimeoutExpired):
            raise
        pytest.fail(f"{nproc} process(es), {epochs} epoch(s): no end after {RUN_TIMEOUT_S} s\n{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def assert_same_training(a: Path, b: Path, sa: dict, sb: dict) -> None:
    wa, wb = load_checkpoint(a / "last.pt")["state_dict"], load_checkpoint(b / "last.pt")["state_dict"]
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa if k not in CANCELLED)
    assert worst < WEIGHT_ATOL, f"weights differ by up to {worst}"
    for ra, rb in zip(sa["history"], sb["history"], strict=True):
        assert (ra["val_uar"], ra["val_wa"]) == (rb["val_uar"], rb["val_wa"])
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)
    assert sa["ids"] == sb["ids"] and sa["labels"] == sb["labels"]  # the gathered set, in the dataset's order
    assert torch.allclose(torch.tensor(sa["probs"]), torch.tensor(sb["probs"]), atol=1e-4)


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_and_resume_across_world_sizes(script: Path, tmp_path: Path) -> None:
    one = run(script, tmp_path / "one", nproc=1, epochs=2)
    two = run(script, tmp_path / "two", nproc=2, epochs=2)
    assert two["world"] == 2 and len(two["ids"]) == 8  # predictions of both ranks gathered: the whole validation set
    assert_same_training(tmp_path / "one", tmp_path / "two", one, two)

    # A checkpoint written by 2 processes resumes with 1, and one written by 1 resumes with 2.
    # The first epoch is all warm-up (warmup_epochs=1), whose learning rates do not depend on
    # the run's length, so stopping after epoch 1 and resuming to 2 is the uninterrupted run.
    for first, then in ((2, 1), (1, 2)):
        out = tmp_path / f"from{first}to{then}"
        run(script, out, nproc=first, epochs=1)
        assert load_checkpoint(out / "last.pt")["epoch"] == 1
        resumed = run(script, out, nproc=then, epochs=2, resume=True)
        assert [r["epoch"] for r in resumed["history"]] == [1, 2]
        assert_same_training(tmp_path / "one", out, one, resumed)


@pytest.mark.slow
def test_two_processes_validate_and_ship_one_batchnorm_model(script: Path, tmp_path: Path) -> None:
    """The 2-D CNN front-end has BatchNorm: each rank updates its running statistics from its own share of the
    batches. They are averaged over the ranks before every validation, so both ranks validate (each its share of the
    clips) with the model rank 0 writes, and the gathered validation figures are that checkpoint's."""
    from training_fixtures import tiny_loaders

    from modeling.training.checkpoint import load_trained_model
    from modeling.training.metrics import compute_metrics
    from modeling.training.train_loop import predict

    cnn = {"audio_frontend": "cnn2d", "audio_channels": [4, 8]}
    out = tmp_path / "bn"
    summary = run(script, out, nproc=2, epochs=1, model=cnn)
    ranks = [torch.load(out / f"running-stats-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0] and ranks[0].keys() == ranks[1].keys()
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    shipped = load_checkpoint(out / "best.pt")["state_dict"]
    for name, value in ranks[0].items():
        assert torch.equal(value, shipped[name]), name
    model, _, _ = load_trained_model(out / "best.pt", "cpu")  # one process, the whole validation set
    _, val = tiny_loaders(str(script.parent / "store"))
    y, probs, ids, _ = predict(model, val, torch.device("cpu"))
    assert ids == summary["ids"]
    assert torch.allclose(torch.from_numpy(probs).float(), torch.tensor(summary["probs"]), atol=1e-5)
    recorded = summary["history"][-1]
    assert compute_metrics(y, probs.argmax(axis=1), len(probs[0])).uar == recorded["val_uar"]


@pytest.mark.slow
def test_with_a_weight_average_two_processes_resume_the_batchnorm_statistics_they_saved(script: Path, tmp_path: Path) -> None:
    """train.ema_decay keeps an average of the weights, BatchNorm statistics included, on every rank: it and the raw
    statistics are made to agree before every validation, so a resumed run (which loads rank 0's) goes on exactly
    as the run that was not stopped."""
    cnn, ema = {"audio_frontend": "cnn2d", "audio_channels": [4, 8]}, {"ema_decay": 0.9}
    straight = run(script, tmp_path / "straight", nproc=2, epochs=2, model=cnn, train=ema)
    run(script, tmp_path / "stopped", nproc=2, epochs=1, model=cnn, train=ema)
    resumed = run(script, tmp_path / "stopped", nproc=2, epochs=2, resume=True, model=cnn, train=ema)
    ranks = [torch.load(tmp_path / "straight" / f"running-stats-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0] and all(torch.equal(v, ranks[1][k]) for k, v in ranks[0].items())  # the raw statistics agree
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "stopped" / "last.pt")
    for key in ("state_dict", "raw_state_dict"):
        for name, value in a[key].items():
            assert torch.allclose(value.float(), b[key][name].float(), atol=1e-6), (key, name)
    assert [r["val_uar"] for r in straight["history"]] == [r["val_uar"] for r in resumed["history"]]
    # Both ranks validated the average rank 0 saved: its loss on the whole validation set in one process is the one
    # recorded from the two ranks' shares (with each rank validating its own average's statistics it was 1.5e-5 off).
    from training_fixtures import tiny_loaders

    from modeling.training.checkpoint import load_trained_model
    from modeling.training.train_loop import predict

    model, _, _ = load_trained_model(tmp_path / "straight" / "last.pt", "cpu")
    _, _, _, loss = predict(model, tiny_loaders(str(script.parent / "store"))[1], torch.device("cpu"))
    assert loss == pytest.approx(straight["history"][-1]["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_fold_trained_by_two_processes_logs_once_from_rank_zero(tmp_path: Path, monkeypatch) -> None:
    """The user path: run_fold(nproc=2) launches torchrun (modeling/training/fold_worker.py); rank 0 alone logs to MLflow,
    writes result.json and sends its training events back to the launching process's progress callback."""
    from mlflow import MlflowClient

    from modeling.data.splits import SplitConfig
    from modeling.tracking.run_logger import MlflowRunLogger
    from modeling.training.experiment import prepare_experiment, run_fold
    from modeling.training.train_loop import TrainConfig

    monkeypatch.setenv("MSATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    build_tiny_store(tmp_path / "store", n_speakers=5, clips_per_speaker=4)
    config = TrainConfig(epochs=2, batch_size=4, num_workers=0, max_duration_s=1.5, probe_weight=0.5)  # rank 0 fits the probe
    run_dir = prepare_experiment(
        str(tmp_path / "store"), "crema-d", config, SplitConfig(n_folds=2), TINY_MODEL, run_dir=tmp_path / "run", logger=MlflowRunLogger()
    )
    events = []
    result = run_fold(run_dir, 0, events.append, nproc=2)
    assert json.loads((run_dir / "fold_0" / "result.json").read_text())["test"] == result.test
    assert sum(sum(row) for row in result.confusion) == len(
        json.loads((run_dir / "experiment.json").read_text())["folds"][0]["test_ids"]
    )  # gathered from both ranks
    assert [e.epoch for e in events if e.kind == "epoch_end"] == [1, 2] and all(e.fold == 0 for e in events)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["msata.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_uar")] == [1, 2]  # once per epoch, not once per rank
    assert run.data.metrics["test_uar"] == pytest.approx(result.test["uar"])
    assert run.data.metrics["test_model_alone_uar"] == pytest.approx(result.probe["test_model"]["uar"])  # the probe, fitted once
    assert run.data.metrics["probe_val_uar"] == pytest.approx(result.probe["probe_val_uar"])
