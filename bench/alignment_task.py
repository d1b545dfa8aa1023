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

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modeling.network.batch import Batch
from modeling.network.encoder import MsataConfig, MsataModel
from modeling.network.losses import ObjectiveParts, ctm_weight, training_objective

N_CLASSES = 2
TASK_KINDS = ("synchrony", "correspondence")

# Fixed before any variant was run on it (the synchrony task above is unchanged).
CORRESPONDENCE_DESIGN = """
Second task, "correspondence": every clip is synchronous, so CTM's assumption (what is close in
time belongs together) holds in every clip, and the label lies in WHICH audio event goes with
WHICH visual event. There are n_types = 4 audio event patterns A_0..A_3 and 4 visual patterns
V_0..V_3 (fixed for the task, drawn from pattern_seed + 1). A clip has 4 event times (the same
process as the synchrony task), shared by both streams. The audio shows the 4 types once each,
in a random order a_1..a_4 (a uniform permutation). Label 1 ("matched", like a phoneme and its
viseme): the visual event at time k is V_{a_k}. Label 0 ("dubbed"): it is V_{a_d(k)} for a
uniformly random derangement d of the 4 positions, so every visual event is wrong for its audio.
Each stream alone is a uniform permutation of its 4 types at the same kind of times in both
classes, and both streams hold the same set of types, so single-modality and counting models are
at chance by construction. Noise, gains, widths, clip length, frame rates and the training budget
are the synchrony task's. Chance 1/2. Same variants, seeds and budget as the synchrony task.
"""


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
    kind: str = "synchrony"  # "synchrony" (above) | "correspondence" (CORRESPONDENCE_DESIGN)
    n_types: int = 4  # correspondence: event types per modality (= n_events: each clip shows every type once)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind {self.kind!r}; expected one of {TASK_KINDS}")
        if self.kind == "correspondence" and self.n_types != self.n_events:
            raise ValueError(f"correspondence needs n_types == n_events, got {self.n_types} and {self.n_events}")


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


def _type_patterns(cfg: TaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_types, n_mels) audio and (n_types, S, S, 3) visual patterns of the correspondence task."""
    g = torch.Generator().manual_seed(cfg.pattern_seed + 1)
    pa = torch.randn(cfg.n_types, cfg.n_mels, generator=g)
    pa = pa / pa.norm(dim=1, keepdim=True) * cfg.audio_event_gain
    pv = torch.sign(torch.randn(cfg.n_types, cfg.crop, cfg.crop, 3, generator=g)) * cfg.video_event_gain
    return pa, pv


def _derangements(k: int) -> torch.Tensor:
    """All permutations of range(k) that move every element: (M, k)."""
    perms = torch.tensor(list(itertools.permutations(range(k))))
    return perms[(perms != torch.arange(k)).all(dim=1)]


def _near_each(times: torch.Tensor, events: torch.Tensor, half_width: float) -> torch.Tensor:
    """(N, T, K) float: 1 where a frame time is within ``half_width`` of event k."""
    return ((times[:, :, None] - events[:, None, :]).abs() <= half_width).float()


def generate_correspondence(n: int, cfg: TaskConfig, seed: int) -> TaskData:
    """n clips of the correspondence task (CORRESPONDENCE_DESIGN), balanced labels, determined by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    pa, pv = _type_patterns(cfg)
    k = cfg.n_events
    ta, tv = int(round(cfg.duration_s * cfg.audio_rate)), int(round(cfg.duration_s * cfg.video_fps))
    labels = torch.arange(n) % N_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    events = event_times(n, cfg, g)  # (n, K), shared by both streams
    audio_types = torch.argsort(torch.rand(n, k, generator=g), dim=1)  # (n, K) a uniform permutation per clip
    der = _derangements(k)
    d = der[torch.randint(len(der), (n,), generator=g)]  # (n, K)
    video_types = torch.where(labels[:, None] == 1, audio_types, torch.gather(audio_types, 1, d))

    audio_times = (torch.arange(ta) / cfg.audio_rate + 0.5 / cfg.audio_rate).expand(n, ta).contiguous()
    audio = torch.randn(n, ta, cfg.n_mels, generator=g)
    audio = audio + torch.einsum("ntk,nkf->ntf", _near_each(audio_times, events, cfg.audio_event_half_s), pa[audio_types])

    offset = torch.rand(n, 1, generator=g) / cfg.video_fps
    video_times = torch.arange(tv) / cfg.video_fps + offset  # (n, Tv)
    video = 128.0 + cfg.video_noise * torch.randn(n, tv, cfg.crop, cfg.crop, 3, generator=g)
    video = video + torch.einsum("ntk,nkxyc->ntxyc", _near_each(video_times, events, cfg.video_event_half_s), pv[video_types])
    video = video.clamp(0, 255).round().to(torch.uint8)
    return TaskData(audio, audio_times, video, video_times, labels, events, events.clone())


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
    if cfg.kind == "correspondence":
        return generate_correspondence(n, cfg, seed)
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
    ctm_on: str = "frontend"  # MsataConfig.ctm_on: the tokens CTM compares
    ctm_schedule: str = "constant"  # TrainConfig.ctm_schedule: the CTM weight over the run (losses.ctm_weight)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("tarope+ctm", lambda_ctm=0.1),  # the default CTM form (front-end tokens), constant weight
        Variant("tarope+ctm-cosine", lambda_ctm=0.1, ctm_schedule="cosine"),  # weight 0.1 at step 0, cosine to 0 at the end
        Variant("tarope+ctm-encoder", lambda_ctm=0.1, ctm_on="encoder"),  # the first form: joint-encoder outputs
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
    eval_every: int = 100  # test accuracy on the first n_eval test clips every this many steps (0: never)
    n_eval: int = 500


@dataclass
class RunResult:
    variant: str
    seed: int
    test_accuracy: float
    final_loss: float  # mean training CE over the last 100 steps (fresh clips, so also a held-out figure)
    seconds: float
    history: list[float] = field(default_factory=list)  # mean training CE of every 100 steps
    ctm_history: list[float] = field(default_factory=list)  # mean CTM loss of every 100 steps (0 without CTM)
    acc_history: list[float] = field(default_factory=list)  # accuracy on the first n_eval test clips every eval_every steps
    steps_to_95: int | None = None  # first evaluated step with accuracy >= 0.95 (None: never)


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
    return fit_variant(variant, test, task, budget, seed, progress)[0]


StepHook = Callable[[int, MsataModel, ObjectiveParts], None]


def fit_variant(
    variant: Variant,
    test: TaskData,
    task: TaskConfig,
    budget: TrainBudget,
    seed: int,
    progress: bool = False,
    on_step: StepHook | None = None,
) -> tuple[RunResult, MsataModel]:
    """``train_variant`` that also returns the trained model; ``on_step(step, model, parts)`` runs
    before each backward pass with the graph intact (bench/ctm_diagnostics.py measures gradients there)."""
    torch.manual_seed(seed)
    config = MsataConfig(
        n_classes=N_CLASSES, n_mels=task.n_mels, d_model=budget.d_model, n_heads=budget.n_heads,
        n_layers=budget.n_layers, dropout=0.0, crop_size=task.crop, video_channels=budget.video_channels,
        positions=variant.positions, fusion=variant.fusion, ctm_dim=budget.d_model, ctm_on=variant.ctm_on,
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
    acc_history: list[float] = []
    probe = None
    if budget.eval_every:
        idx = torch.arange(min(budget.n_eval, len(test)))
        probe = TaskData(*(getattr(test, f)[idx] for f in TaskData.__dataclass_fields__))
    running, running_ctm, start = 0.0, 0.0, time.perf_counter()
    for step in range(budget.steps):
        batch = generate(budget.batch_size, task, seed=training_seed(seed, step)).batch(drop=variant.drop)
        out = model(batch)
        # the training path's schedule (modeling.network.losses.ctm_weight), over this run's steps
        lam = ctm_weight(variant.lambda_ctm, variant.ctm_schedule, step, budget.steps)
        parts = training_objective(
            out, batch.labels, lambda_ctm=lam, projector=model.ctm_head,
            sigma=config.ctm_sigma, tau=config.ctm_tau,
        )  # fmt: skip
        if on_step is not None:
            on_step(step, model, parts)
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
        if probe is not None and (step + 1) % budget.eval_every == 0:
            acc_history.append(accuracy(model, probe, variant.drop))
    seconds = time.perf_counter() - start
    reached = [i for i, a in enumerate(acc_history) if a >= 0.95]
    result = RunResult(
        variant=variant.name,
        seed=seed,
        test_accuracy=accuracy(model, test, variant.drop),
        final_loss=history[-1] if history else float("nan"),
        seconds=seconds,
        history=history,
        ctm_history=ctm_history,
        acc_history=acc_history,
        steps_to_95=(reached[0] + 1) * budget.eval_every if reached else None,
    )
    return result, model
