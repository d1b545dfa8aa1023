"""Data-parallel training over several processes (torchrun): one process per GPU, or gloo on CPU.

Launch. ``msata train --nproc N`` and the ``train-msata`` flow parameter ``nproc`` run
each fold as ``torchrun --standalone --nproc-per-node N -m modeling.training.fold_worker RUN_DIR
FOLD`` (:func:`torchrun_command`); Prefect, MLflow's parent run and the run directory
stay in the one process that launched it. Backend: nccl on CUDA, gloo on CPU.

Batches. ``train.batch_size`` is the **global** batch: the epoch's permutation (the
same one a single process uses) is cut into global batches, and rank r takes
positions r, r + W, r + 2W... of each (``modeling.data.dataset.ShardedBatchSampler``). So the
union of the ranks' step-k batches is the single-process step-k batch, whatever W,
and a checkpoint resumes with any number of processes (the scheduler counts global
steps). The last, uneven global batch is split as evenly as it goes (ranks differ
by at most one clip); a rank left with no clip skips the forward pass and
contributes zero gradients. Nothing is padded or dropped.

Gradients. Each rank scales its loss by (its clips / the global batch's clips), runs
backward, and :func:`allreduce_gradients` sums one flat gradient buffer over the
ranks: the result is the gradient of the global batch's mean loss, exactly what one
process computes (up to float summation order). We do not wrap the model in
``DistributedDataParallel``: the CTM projection head is applied in the loss, outside
``forward`` (DDP would need ``find_unused_parameters``, which then errs on it), a
batch without faces leaves the video front-end unused, and empty shards need weight
0. Parameters no rank used keep ``grad=None``, as in one process, so AdamW skips them
alike. The cost is no overlap of communication with backward: one all-reduce of the
whole gradient (msata's models are a few million parameters) per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

EVENT_PREFIX = "MSATA_EVENT "  # a rank-0 stdout line carrying one training event as JSON


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def context_from_env() -> DistContext:
    """The rank, world size and local rank torchrun exports; one process without them."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    try:
        ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"torchrun environment is incomplete or not integers: {err} (RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r})"
        ) from err
    if not 0 <= ctx.rank < ctx.world_size:
        raise ValueError(f"RANK={ctx.rank} is outside WORLD_SIZE={ctx.world_size}")
    return ctx


def device_for(device: torch.device, ctx: DistContext) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when training on CUDA with several processes."""
    if device.type != "cuda" or not ctx.enabled:
        return device
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise ValueError(f"LOCAL_RANK={ctx.local_rank} but this host has {count} CUDA device(s): use --nproc {count} or fewer")
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


def start(ctx: DistContext, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU); no-op for one process."""
    if not ctx.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size, device_id=device if device.type == "cuda" else None)


def stop(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def allreduce_gradients(params: Sequence[nn.Parameter], ctx: DistContext) -> None:
    """Sum every parameter's gradient over the ranks, in one flat all-reduce.

    A parameter's gradient stays None only when it is None on every rank (as in one
    process, where an unused parameter has no gradient and the optimiser skips it)."""
    if not ctx.enabled:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)  # (P,)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params] + [present])
    dist.all_reduce(flat)
    offset = 0
    flags = flat[-len(params) :].tolist()
    for p, used in zip(params, flags, strict=True):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if used > 0 else None
        offset += n


def average_batchnorm_statistics(model: nn.Module, ctx: DistContext) -> None:
    """Make every rank's BatchNorm running mean and variance the mean over the ranks (one flat all-reduce), and its
    batch counter rank 0's.

    Each rank updates its running statistics from its own share of the batches, so without this the ranks would
    validate (each predicting its share of the clips) with different models, and rank 0 would ship its own. Called
    before every validation: the model every rank evaluates is then the one rank 0 writes. (Training batches are
    still normalised by each rank's own share, not by the global batch as ``SyncBatchNorm`` would; the mean of the
    ranks' variances is not the variance of their union either: both are what ``DistributedDataParallel`` users get
    without ``SyncBatchNorm``, with the ranks kept alike.)"""
    if not ctx.enabled:
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    stats = [t for m in norms for t in (m.running_mean, m.running_var) if t is not None]
    if stats:
        # float64: a sum of N equal float32 values divided by N is that value exactly, whatever N
        flat = torch.cat([t.reshape(-1).double() for t in stats])
        dist.all_reduce(flat)
        flat /= ctx.world_size
        offset = 0
        for t in stats:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    counters = [m.num_batches_tracked for m in norms if m.num_batches_tracked is not None]
    if counters:  # a rank without a clip in a step did not count it: rank 0's counts, in one broadcast
        flat = torch.stack([c.reshape(()) for c in counters])
        dist.broadcast(flat, src=0)
        for c, value in zip(counters, flat, strict=True):
            c.copy_(value)


def _reduce_device() -> torch.device:
    # nccl reduces CUDA tensors only, gloo CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def allreduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of a few numbers over the ranks (float64)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def allreduce_max(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled: small results only)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def interleave(parts: Sequence[Sequence[Any]]) -> list[Any]:
    """Undo a strided split: rank r held items r, r + W, ...; returns them in the original order."""
    out: list[Any] = []
    longest = max((len(p) for p in parts), default=0)
    for i in range(longest):
        out.extend(p[i] for p in parts if i < len(p))
    return out


# ----------------------------------------------------------------------------- launching


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m MODULE ARGS`` with this interpreter."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module, *args]


def emit_event(data: dict[str, Any]) -> None:
    """Rank 0 of a worker: one training event on stdout for the launching process."""
    print(EVENT_PREFIX + json.dumps(data), flush=True)


def run_streaming(command: list[str], on_event: Callable[[dict[str, Any]], None], on_line: Callable[[str], None], what: str) -> None:
    """Run ``command``, handing event lines to ``on_event`` and other lines to ``on_line``;
    RuntimeError naming ``what``, the exit status and the last lines when it fails."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=8)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(EVENT_PREFIX):
                on_event(json.loads(line[len(EVENT_PREFIX) :]))
                continue
            tail.append(line)
            on_line(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # an exception here (Ctrl-C, a failing callback): the ranks must not outlive us
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code != 0:
        last = " | ".join(line.strip() for line in tail if line.strip())[-600:]
        raise RuntimeError(f"{what} exited with status {code}: {last}")
