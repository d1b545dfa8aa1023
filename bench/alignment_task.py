"""A synthetic audio-visual temporal-alignment task, and one training run on it.

Each clip lasts ``duration_s``. Audio: 50 frames/s of Gaussian noise over
``n_mels`` channels, centre times k/50 + 10 ms. Video: 30 frames/s of noisy
``crop`` x ``crop`` RGB images, frame times j/30 + u with a per-clip start
offset u ~ U[0, 1/30) (real streams rarely start together). Every clip holds
exactly one audio event of type A, one of type B (a fixed channel pattern added
to the frames within ``audio_event_half_s`` of the event time) and one visual
event V (a fixed pixel pattern on the frame nearest its time).

Three mutually separated times T1, T2, T3 are drawn exchangeably; A is at T1,
B at T2 and the label says where V is:

    0: V at T3 (coincides with nothing)   1: V at T1 (with A)   2: V at T2 (with B)

So the audio stream alone (A at T1, B at T2) has the same distribution in
every class, the video stream alone (V at one of three exchangeable times) too,
and the event counts are constant: any single-modality or counting model is at
chance (1/3). Only the relative timing of audio and visual events carries the
label, and it is only visible to a model that can line the two streams up in
time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from modeling.batch import Batch
from modeling.encoder import MsataConfig, MsataModel
from modeling.losses import training_objective

N_CLASSES = 3


@dataclass(frozen=True)
class TaskConfig:
    duration_s: float = 2.0
    audio_rate: float = 50.0
    video_fps: float = 30.0
    n_mels: int = 16
    crop: int = 8
    min_separation_s: float = 0.3  # between T1, T2, T3
    margin_s: float = 0.15  # events stay this far from the clip edges
    audio_event_half_s: float = 0.03  # audio frames within +-30 ms of an event carry it
    audio_event_gain: float = 3.0  # pattern norm per frame, against unit-variance noise per channel
    video_noise: float = 30.0  # pixel noise std around mid-grey
    video_event_gain: float = 70.0  # pixel amplitude of the visual event pattern
    pattern_seed: int = 1234  # the event patterns are fixed for the task, not per clip


@dataclass
class TaskData:
    audio: torch.Tensor  # (N, Ta, n_mels) float32
    audio_times: torch.Tensor  # (N, Ta) float32
    video: torch.Tensor  # (N, Tv, S, S, 3) uint8
    video_times: torch.Tensor  # (N, Tv) float32
    labels: torch.Tensor  # (N,) int64
    event_times: torch.Tensor  # (N, 3) T1, T2, T3 seconds

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor, drop: str | None = None) -> Batch:
        """Rows ``idx`` as a Batch; ``drop`` = "audio" | "video" removes that modality."""
        b = idx.shape[0]
        audio, audio_times = self.audio[idx], self.audio_times[idx]
        video, video_times = self.video[idx], self.video_times[idx]
        if drop == "audio":
            audio, audio_times = audio[:, :0], audio_times[:, :0]
        elif drop == "video":
            video, video_times = video[:, :0], video_times[:, :0]
        elif drop is not None:
            raise ValueError(f"drop must be 'audio', 'video' or None, got {drop!r}")
        return Batch(
            audio=audio,
            audio_times=audio_times,
            audio_mask=torch.ones(audio.shape[:2], dtype=torch.bool),
            video=video,
            video_times=video_times,
            video_mask=torch.ones(video.shape[:2], dtype=torch.bool),
            labels=self.labels[idx],
            clip_ids=[f"clip{i}" for i in idx.tolist()],
        )


def _patterns(cfg: TaskConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.pattern_seed)
    pa = torch.randn(cfg.n_mels, generator=g)
    pb = torch.randn(cfg.n_mels, generator=g)
    pb = pb - (pb @ pa) / (pa @ pa) * pa  # A and B orthogonal: equally easy to tell apart
    pa, pb = (p / p.norm() * cfg.audio_event_gain for p in (pa, pb))
    pv = torch.sign(torch.randn(cfg.crop, cfg.crop, 3, generator=g)) * cfg.video_event_gain
    return pa, pb, pv


def _event_times(n: int, cfg: TaskConfig, g: torch.Generator) -> torch.Tensor:
    """(n, 3) exchangeable times in [margin, duration - margin], pairwise >= min_separation apart."""
    lo, hi = cfg.margin_s, cfg.duration_s - cfg.margin_s
    out = torch.empty(n, 3)
    filled = 0
    while filled < n:  # rejection sampling, vectorised per round
        cand = lo + (hi - lo) * torch.rand(2 * (n - filled) + 16, 3, generator=g)
        d = (cand[:, :, None] - cand[:, None, :]).abs() + torch.eye(3) * 1e9
        ok = cand[d.amin(dim=(1, 2)) >= cfg.min_separation_s][: n - filled]
        out[filled : filled + ok.shape[0]] = ok
        filled += ok.shape[0]
    return out


def generate(n: int, cfg: TaskConfig, seed: int) -> TaskData:
    """n clips with balanced labels (shuffled), fully determined by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    pa, pb, pv = _patterns(cfg)
    ta, tv = int(round(cfg.duration_s * cfg.audio_rate)), int(round(cfg.duration_s * cfg.video_fps))
    labels = torch.arange(n) % N_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    times = _event_times(n, cfg, g)  # (n, 3)
    t_v = times.gather(1, torch.tensor([2, 0, 1])[labels].unsqueeze(1)).squeeze(1)  # label 0 -> T3, 1 -> T1, 2 -> T2

    audio_times = (torch.arange(ta) / cfg.audio_rate + 0.5 / cfg.audio_rate).expand(n, ta)  # frame centres
    audio = torch.randn(n, ta, cfg.n_mels, generator=g)
    near_a = ((audio_times - times[:, :1]).abs() <= cfg.audio_event_half_s).float()  # (n, Ta)
    near_b = ((audio_times - times[:, 1:2]).abs() <= cfg.audio_event_half_s).float()
    audio = audio + near_a[..., None] * pa + near_b[..., None] * pb

    offset = torch.rand(n, 1, generator=g) / cfg.video_fps
    video_times = torch.arange(tv) / cfg.video_fps + offset  # (n, Tv)
    video = 128.0 + cfg.video_noise * torch.randn(n, tv, cfg.crop, cfg.crop, 3, generator=g)
    nearest = (video_times - t_v[:, None]).abs().argmin(dim=1)  # (n,)
    video[torch.arange(n), nearest] += pv
    video = video.clamp(0, 255).round().to(torch.uint8)
    return TaskData(audio, audio_times.contiguous(), video, video_times, labels, times)


@dataclass(frozen=True)
class Variant:
    name: str
    positions: str = "tarope"
    fusion: str = "joint"
    lambda_ctm: float = 0.0
    drop: str | None = None  # "audio" / "video": single-modality baseline


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("tarope+ctm", lambda_ctm=0.1),
        Variant("tarope"),
        Variant("index", positions="index"),
        Variant("none", positions="none"),
        Variant("late", fusion="late"),
        Variant("audio-only", drop="video"),
        Variant("video-only", drop="audio"),
    )
}


@dataclass(frozen=True)
class TrainBudget:
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 2
    video_channels: tuple[int, ...] = (16, 32)


@dataclass
class RunResult:
    variant: str
    seed: int
    test_accuracy: float
    train_accuracy: float
    final_loss: float
    seconds: float
    history: list[float] = field(default_factory=list)  # training loss every 50 steps


@torch.no_grad()
def accuracy(model: MsataModel, data: TaskData, drop: str | None, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        batch = data.batch(idx, drop)
        correct += int((model(batch).logits.argmax(-1) == batch.labels).sum())
    model.train()
    return correct / len(data)


def train_variant(
    variant: Variant,
    train: TaskData,
    test: TaskData,
    task: TaskConfig,
    budget: TrainBudget,
    seed: int,
    progress: bool = False,
) -> RunResult:
    """Train one variant from scratch with a fixed budget; same seed -> same init and batch order."""
    torch.manual_seed(seed)
    config = MsataConfig(
        n_classes=N_CLASSES, n_mels=task.n_mels, d_model=budget.d_model, n_heads=budget.n_heads,
        n_layers=budget.n_layers, dropout=0.0, crop_size=task.crop, video_channels=budget.video_channels,
        positions=variant.positions, fusion=variant.fusion, ctm_dim=budget.d_model,
    )  # fmt: skip
    model = MsataModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 0
        if step < budget.warmup_steps:
            return (step + 1) / budget.warmup_steps
        progress = (step - budget.warmup_steps) / max(1, budget.steps - budget.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order = torch.Generator().manual_seed(seed)
    history: list[float] = []
    running, start = 0.0, time.perf_counter()
    for step in range(budget.steps):
        idx = torch.randint(0, len(train), (budget.batch_size,), generator=order)
        batch = train.batch(idx, variant.drop)
        out = model(batch)
        parts = training_objective(
            out, batch.labels, lambda_ctm=variant.lambda_ctm, projector=model.ctm_head,
            sigma=config.ctm_sigma, tau=config.ctm_tau,
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += float(parts.ce.detach())
        if (step + 1) % 50 == 0:
            history.append(running / 50)
            running = 0.0
            if progress:
                print(f"  {variant.name} seed={seed} step={step + 1} ce={history[-1]:.4f}", flush=True)
    return RunResult(
        variant=variant.name,
        seed=seed,
        test_accuracy=accuracy(model, test, variant.drop),
        train_accuracy=accuracy(model, train, variant.drop),
        final_loss=history[-1] if history else float("nan"),
        seconds=time.perf_counter() - start,
        history=history,
    )
