"""A synthetic audio-visual synchrony task, and one training run on it.

Each clip lasts ``duration_s``. Audio: 50 frames/s of Gaussian noise over
``n_mels`` channels, frame centres k/50 + 10 ms. Video: 30 frames/s of noisy
``crop`` x ``crop`` RGB images, frame times j/30 + u with a per-clip start
offset u ~ U[0, 1/30) (real streams rarely start together). Every clip holds
``n_events`` audio events (a fixed channel pattern on the frames within
``audio_event_half_s`` of each event time) and ``n_events`` visual events (a
fixed pixel pattern on the frames within ``video_event_half_s``), like syllables
and the mouth movements that go with them.

Both streams draw their event times from the same process: ``n_events`` times,
pairwise at least ``min_separation_s`` apart, at least ``margin_s`` from the
edges. The label says whether the two streams share them:

    1 (synchronous): the visual events happen at the audio event times
    0 (independent): the visual event times are a second, independent draw

So the audio stream alone has the same distribution in both classes, the video
stream alone too, and the event counts are constant: any single-modality or
counting model is at chance (1/2). Only the relative timing of audio and visual
events carries the label, and only a model that can line the two streams up in
time can read it. Audio index k and video index j of the same instant differ by
k - j = 20 t, which grows through the clip, so per-stream index positions
cannot express "same instant" with one relative offset.

Training data is generated fresh for every batch (a new seed per step), so no
clip is seen twice and memorising the training set is impossible; the test set
is a fixed draw from another seed.

History: a first version (one visual event and two audio event types, three
classes, a fixed training set of 3000 clips) could not separate the variants:
no variant left the ln 3 plateau within 600 steps, and with more steps the
models memorised the fixed training set (98.5 % train, 31 % test). See
docs/benchmarks.md for those figures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from modeling.batch import Batch
from modeling.encoder import MsataConfig, MsataModel
from modeling.losses import training_objective

N_CLASSES = 2


@dataclass(frozen=True)
class TaskConfig:
    duration_s: float = 2.0
    audio_rate: float = 50.0
    video_fps: float = 30.0
    n_mels: int = 16
    crop: int = 8
    n_events: int = 4  # per stream and clip
    min_separation_s: float = 0.25  # between the events of one stream
    margin_s: float = 0.1  # events stay this far from the clip edges
    audio_event_half_s: float = 0.04  # audio frames within +-40 ms of an event carry it (4-5 frames)
    video_event_half_s: float = 0.05  # video frames within +-50 ms carry it (3 frames)
    audio_event_gain: float = 3.0  # pattern norm per frame, against unit-variance noise per channel
    video_noise: float = 30.0  # pixel noise std around mid-grey
    video_event_gain: float = 50.0  # pixel amplitude of the visual event pattern
    pattern_seed: int = 1234  # the event patterns are fixed for the task, not per clip


@dataclass
class TaskData:
    audio: torch.Tensor  # (N, Ta, n_mels) float32
    audio_times: torch.Tensor  # (N, Ta) float32
    video: torch.Tensor  # (N, Tv, S, S, 3) uint8
    video_times: torch.Tensor  # (N, Tv) float32
    labels: torch.Tensor  # (N,) int64
    audio_event_times: torch.Tensor  # (N, n_events) seconds
    video_event_times: torch.Tensor  # (N, n_events) seconds

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor | None = None, drop: str | None = None) -> Batch:
        """Rows ``idx`` (all when None) as a Batch; ``drop`` = "audio" | "video" removes that modality."""
        idx = torch.arange(len(self)) if idx is None else idx
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


def _patterns(cfg: TaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.pattern_seed)
    pa = torch.randn(cfg.n_mels, generator=g)
    pa = pa / pa.norm() * cfg.audio_event_gain
    pv = torch.sign(torch.randn(cfg.crop, cfg.crop, 3, generator=g)) * cfg.video_event_gain
    return pa, pv


def event_times(n: int, cfg: TaskConfig, g: torch.Generator) -> torch.Tensor:
    """(n, n_events) sorted times in [margin, duration - margin], pairwise >= min_separation apart."""
    lo, hi, k = cfg.margin_s, cfg.duration_s - cfg.margin_s, cfg.n_events
    if (k - 1) * cfg.min_separation_s > 0.8 * (hi - lo):
        raise ValueError(f"{k} events {cfg.min_separation_s} s apart do not fit comfortably in [{lo}, {hi}] s")
    out = torch.empty(n, k)
    filled = 0
    while filled < n:  # rejection sampling, vectorised per round
        cand = (lo + (hi - lo) * torch.rand(4 * (n - filled) + 16, k, generator=g)).sort(dim=1).values
        gaps = cand.diff(dim=1)
        ok = cand[(gaps >= cfg.min_separation_s).all(dim=1)][: n - filled]
        out[filled : filled + ok.shape[0]] = ok
        filled += ok.shape[0]
    return out


def _near_any(times: torch.Tensor, events: torch.Tensor, half_width: float) -> torch.Tensor:
    """(N, T) float: 1 where a frame time is within ``half_width`` of one of the clip's events."""
    return ((times[:, :, None] - events[:, None, :]).abs() <= half_width).any(dim=-1).float()


def generate(n: int, cfg: TaskConfig, seed: int) -> TaskData:
    """n clips with balanced labels (shuffled), fully determined by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    pa, pv = _patterns(cfg)
    ta, tv = int(round(cfg.duration_s * cfg.audio_rate)), int(round(cfg.duration_s * cfg.video_fps))
    labels = torch.arange(n) % N_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    audio_events = event_times(n, cfg, g)  # (n, K)
    independent = event_times(n, cfg, g)  # (n, K), same process, drawn independently
    video_events = torch.where(labels[:, None] == 1, audio_events, independent)

    audio_times = (torch.arange(ta) / cfg.audio_rate + 0.5 / cfg.audio_rate).expand(n, ta).contiguous()
    audio = torch.randn(n, ta, cfg.n_mels, generator=g)
    audio = audio + _near_any(audio_times, audio_events, cfg.audio_event_half_s)[..., None] * pa

    offset = torch.rand(n, 1, generator=g) / cfg.video_fps
    video_times = torch.arange(tv) / cfg.video_fps + offset  # (n, Tv)
    video = 128.0 + cfg.video_noise * torch.randn(n, tv, cfg.crop, cfg.crop, 3, generator=g)
    video = video + _near_any(video_times, video_events, cfg.video_event_half_s)[..., None, None, None] * pv
    video = video.clamp(0, 255).round().to(torch.uint8)
    return TaskData(audio, audio_times, video, video_times, labels, audio_events, video_events)


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
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 2
    video_channels: tuple[int, ...] = (16, 32)


@dataclass
class RunResult:
    variant: str
    seed: int
    test_accuracy: float
    final_loss: float  # mean training CE over the last 100 steps (fresh clips, so also a held-out figure)
    seconds: float
    history: list[float] = field(default_factory=list)  # mean training CE of every 100 steps
    ctm_history: list[float] = field(default_factory=list)  # mean CTM loss of every 100 steps (0 without CTM)


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


def training_seed(run_seed: int, step: int) -> int:
    """Seed of the fresh training batch at ``step``: the same for every variant of a run seed."""
    return 1_000_000 * (run_seed + 1) + step


def train_variant(
    variant: Variant,
    test: TaskData,
    task: TaskConfig,
    budget: TrainBudget,
    seed: int,
    progress: bool = False,
) -> RunResult:
    """Train one variant from scratch on fresh clips every step; same seed -> same init and same clips."""
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
    history: list[float] = []
    ctm_history: list[float] = []
    running, running_ctm, start = 0.0, 0.0, time.perf_counter()
    for step in range(budget.steps):
        batch = generate(budget.batch_size, task, seed=training_seed(seed, step)).batch(drop=variant.drop)
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
        running_ctm += float(parts.ctm.detach())
        if (step + 1) % 100 == 0:
            history.append(running / 100)
            ctm_history.append(running_ctm / 100)
            running, running_ctm = 0.0, 0.0
            if progress:
                print(f"  {variant.name} seed={seed} step={step + 1} ce={history[-1]:.4f} ctm={ctm_history[-1]:.3f}", flush=True)
    return RunResult(
        variant=variant.name,
        seed=seed,
        test_accuracy=accuracy(model, test, variant.drop),
        final_loss=history[-1] if history else float("nan"),
        seconds=time.perf_counter() - start,
        history=history,
        ctm_history=ctm_history,
    )
