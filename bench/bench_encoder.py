"""Forward+backward time of the msata model with positions = tarope / index / none.

The three variants have identical weights (the position modules hold no
parameters) and see the same batch; repetitions are interleaved (variant order
shuffled each round) so that machine load drifts hit all of them alike. Two
parts are timed:

  model    front-ends + transformer + classifier on a Batch (what training pays)
  encoder  the transformer stack alone on ready-made tokens (where the rotary
           maths live, so the relative overhead is the largest here)

    python bench/bench_encoder.py                                  # paper shapes, slow on CPU
    python bench/bench_encoder.py --batch 4 --crop 48 --threads 2  # CPU-sized
    python bench/bench_encoder.py --device cuda --bf16             # GPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.network.batch import Batch  # noqa: E402
from modeling.network.encoder import MsataConfig, MsataModel, rotary_positions  # noqa: E402
from modeling.network.frontends import Tokens  # noqa: E402

VARIANTS = ("tarope", "index", "none")


def synthetic_batch(b: int, ta: int, tv: int, crop: int, n_mels: int, fps: float, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        audio=torch.randn(b, ta, n_mels, generator=g),
        audio_times=(torch.arange(ta) / 50.0 + 0.0125).expand(b, ta).contiguous(),
        audio_mask=torch.ones(b, ta, dtype=torch.bool),
        video=torch.randint(0, 256, (b, tv, crop, crop, 3), generator=g, dtype=torch.uint8),
        video_times=(torch.arange(tv) / fps).expand(b, tv).contiguous(),
        video_mask=torch.ones(b, tv, dtype=torch.bool),
        labels=torch.randint(0, 6, (b,), generator=g),
        clip_ids=[f"bench{i}" for i in range(b)],
    )
    return batch.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="run under torch.autocast(bfloat16)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--audio-frames", type=int, default=200, help="4 s at 50 frames/s")
    parser.add_argument("--video-frames", type=int, default=120, help="4 s at 30 fps")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--parts", default="model,encoder", help="comma list of: model, encoder")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - {"model", "encoder"}:
        raise SystemExit(f"unknown --parts {sorted(unknown)}")

    models: dict[str, MsataModel] = {}
    for kind in VARIANTS:
        torch.manual_seed(0)
        models[kind] = MsataModel(MsataConfig(positions=kind, crop_size=args.crop)).to(device).train()
    cfg = models["none"].config
    batch = synthetic_batch(args.batch, args.audio_frames, args.video_frames, args.crop, cfg.n_mels, args.fps, device)
    t_all = args.audio_frames + args.video_frames
    token_times = torch.cat([batch.audio_times, batch.video_times], dim=1)
    tokens = Tokens(
        x=torch.randn(args.batch, t_all, cfg.d_model, device=device, requires_grad=True),
        times=token_times,
        mask=torch.ones(args.batch, t_all, dtype=torch.bool, device=device),
    )

    def make_step(kind: str, part: str) -> Callable[[], None]:
        model = models[kind]
        positions = rotary_positions(kind, [batch.audio_times, batch.video_times], cfg.rotary_rate)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                out = model(batch).logits if part == "model" else model.encoder(tokens, positions)
            out.float().square().mean().backward()

        return step

    print(
        f"device={device} bf16={args.bf16} batch={args.batch} audio={args.audio_frames} video={args.video_frames} "
        f"crop={args.crop} d_model={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    rng = random.Random(0)
    for part in parts:
        steps = {kind: make_step(kind, part) for kind in VARIANTS}
        for _ in range(args.warmup):
            for kind in VARIANTS:
                steps[kind]()
        times: dict[str, list[float]] = {kind: [] for kind in VARIANTS}
        for _ in range(args.reps):
            order = list(VARIANTS)
            rng.shuffle(order)
            for kind in order:
                times[kind].append(time_step(steps[kind], device))
        none_ms = statistics.median(times["none"])
        print(f"\n{part}: forward+backward, {args.reps} interleaved reps")
        print("| positions | median ms | min ms | max ms | ratio vs none |")
        print("|---|---|---|---|---|")
        for kind in VARIANTS:
            med = statistics.median(times[kind])
            print(f"| {kind} | {med:.1f} | {min(times[kind]):.1f} | {max(times[kind]):.1f} | {med / none_ms:.3f} |")


if __name__ == "__main__":
    main()
