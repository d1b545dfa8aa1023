"""Why does CTM stop (or help) learning on the synchrony task? Measurements, not guesses.

For each variant (same seed, clips and initialisation as bench/bench_alignment.py):

1. Gradient scale, every ``--every`` steps, before the update: the norms of the CE gradient and of
   the lambda-weighted CTM gradient per parameter group (front-ends, encoder, heads), their cosine
   on the parameters both reach, and the CE gradient that survives the global clip to norm 1
   (``clip_grad_norm_`` scales the *sum*, so a large CTM gradient shrinks the CE step too).
2. Shortcut probes on held-out clips after training: the CTM loss on synchronous clips, on
   independent clips, and on clips whose video frames are shuffled in time (content moved, times
   kept). A CTM that is as low on shuffled or independent clips as on synchronous ones is not
   measuring audio-visual agreement: it is lowered by where the tokens are, not what they show.
   Reference values: the targets' entropy (the floor) and the loss of a uniform prediction.

    python bench/ctm_diagnostics.py --variants tarope+ctm-encoder,tarope+ctm --steps 400 --json /tmp/diag.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.alignment_task import VARIANTS, TaskConfig, TaskData, TrainBudget, Variant, fit_variant, generate  # noqa: E402
from modeling.network.encoder import MsataModel  # noqa: E402
from modeling.network.losses import (  # noqa: E402
    ObjectiveParts,
    _masked_mean,
    _soft_cross_entropy,
    ctm_loss,
    ctm_loss_from_output,
    ctm_weight,
)

GROUPS = ("audio_frontend", "video_frontend", "encoder", "ctm_head", "classifier")


def _group_of(name: str) -> str:
    for g in GROUPS:
        if name.startswith(g):
            return g
    return "other"  # modality embeddings, pooling


def gradient_record(step: int, model: MsataModel, parts: ObjectiveParts, lambda_ctm: float) -> dict:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensors = [p for _, p in params]
    g_ce = torch.autograd.grad(parts.ce, tensors, retain_graph=True, allow_unused=True)
    g_ctm = (
        torch.autograd.grad(lambda_ctm * parts.ctm, tensors, retain_graph=True, allow_unused=True)
        if parts.ctm.requires_grad
        else [None] * len(tensors)
    )
    rec: dict = {"step": step, "ce": float(parts.ce), "ctm": float(parts.ctm)}
    sq: dict[str, list[float]] = {}
    dot = n_ce_shared = n_ctm_shared = 0.0
    total = 0.0
    for (name, p), a, b in zip(params, g_ce, g_ctm, strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        s = sq.setdefault(_group_of(name), [0.0, 0.0])
        s[0] += float(a.square().sum())
        s[1] += float(b.square().sum())
        total += float((a + b).square().sum())
        if float(a.abs().sum()) > 0 and float(b.abs().sum()) > 0:
            dot += float((a * b).sum())
            n_ce_shared += float(a.square().sum())
            n_ctm_shared += float(b.square().sum())
    rec["groups"] = {g: {"ce": v[0] ** 0.5, "ctm": v[1] ** 0.5} for g, v in sq.items()}
    ce_norm = sum(v[0] for v in sq.values()) ** 0.5
    rec["ce_norm"], rec["ctm_norm"] = ce_norm, sum(v[1] for v in sq.values()) ** 0.5
    rec["cosine_shared"] = dot / max(1e-12, (n_ce_shared * n_ctm_shared) ** 0.5)
    clip = min(1.0, 1.0 / max(total**0.5, 1e-12))
    rec["ce_after_clip"] = ce_norm * clip  # what CE alone would have been clipped to: min(ce_norm, 1)
    rec["ce_alone_after_clip"] = min(ce_norm, 1.0)
    return rec


@torch.no_grad()
def probe_ctm(model: MsataModel, data: TaskData, sigma: float, tau: float, seed: int = 0) -> dict[str, float]:
    model.eval()
    sync = data.labels == 1
    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(seed)
    for name, idx, shuffle in (("sync", sync, False), ("independent", ~sync, False), ("sync_video_shuffled", sync, True)):
        rows = torch.nonzero(idx).squeeze(1)
        batch = data.batch(rows)
        if shuffle:  # move every clip's video frames to random times; timestamps stay where they were
            perm = torch.stack([torch.randperm(batch.video.shape[1], generator=g) for _ in range(len(rows))])
            batch.video = torch.take_along_dim(batch.video, perm[:, :, None, None, None], dim=1)
        o = model(batch)
        out[name] = float(ctm_loss_from_output(o, projector=model.ctm_head, sigma=sigma, tau=tau))
    # Floor (targets' entropy: logits equal to the log targets) and a uniform prediction, same clips.
    b = data.batch(torch.nonzero(sync).squeeze(1))
    o = model(b)
    ta, tv = o.audio_times, o.video_times
    zeros_a = torch.zeros(*ta.shape, 1)
    zeros_v = torch.zeros(*tv.shape, 1)
    offset2 = (ta[:, :, None] - tv[:, None, :]).square()
    pair = o.audio_mask[:, :, None] & o.video_mask[:, None, :]
    logw = -offset2 / (2 * sigma**2)
    near = pair & (offset2 <= (3 * sigma) ** 2)
    ent_a = _soft_cross_entropy(logw, logw, pair, dim=2)
    ent_v = _soft_cross_entropy(logw, logw, pair, dim=1)
    out["floor"] = 0.5 * float(_masked_mean(ent_a, near.any(2)) + _masked_mean(ent_v, near.any(1)))
    out["uniform"] = float(ctm_loss(zeros_a + 1, ta, o.audio_mask, zeros_v + 1, tv, o.video_mask, sigma=sigma, tau=tau))
    model.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="tarope+ctm-encoder,tarope+ctm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50, help="measure gradients every this many steps")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--lambda-ctm", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task, budget = TaskConfig(), TrainBudget(steps=args.steps, eval_every=100, n_eval=500)
    test = generate(args.n_test, task, seed=20_000 + args.seed)
    report = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        variant = VARIANTS[name] if args.lambda_ctm is None else replace(VARIANTS[name], lambda_ctm=args.lambda_ctm)
        records: list[dict] = []

        def hook(
            step: int, model: MsataModel, parts: ObjectiveParts, variant: Variant = variant, records: list = records, name: str = name
        ) -> None:
            if step % args.every == 0:
                # the weight this step trained with (a scheduled variant's weight changes with the step)
                lam = ctm_weight(variant.lambda_ctm, variant.ctm_schedule, step, budget.steps)
                records.append(gradient_record(step, model, parts, lam))
                r = records[-1]
                print(
                    f"  {name} step={step} ce={r['ce']:.3f} ctm={r['ctm']:.3f} |gCE|={r['ce_norm']:.3f} "
                    f"|l*gCTM|={r['ctm_norm']:.3f} cos={r['cosine_shared']:+.2f} CE after clip={r['ce_after_clip']:.3f} "
                    + " ".join(f"{g}:{v['ce']:.2f}/{v['ctm']:.2f}" for g, v in r["groups"].items()),
                    flush=True,
                )

        result, model = fit_variant(variant, test, task, budget, args.seed, progress=True, on_step=hook)
        probes = probe_ctm(model, test, model.config.ctm_sigma, model.config.ctm_tau)
        print(f"{name}: test_acc={result.test_accuracy:.3f} acc_history={result.acc_history} probes={probes}", flush=True)
        report[name] = {"result": result.__dict__, "gradients": records, "probes": probes}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
