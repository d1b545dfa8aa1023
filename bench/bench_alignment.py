"""Train every variant on the synthetic audio-visual synchrony task; report test accuracy.

Same clips, budget and seeds for every variant (see bench/alignment_task.py for
the task). Chance is 1/2.

    python bench/bench_alignment.py                       # all variants, 3 seeds, 1 thread
    python bench/bench_alignment.py --variants tarope,index --seeds 1 --steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.alignment_task import VARIANTS, RunResult, TaskConfig, TrainBudget, generate, train_variant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=TrainBudget.steps)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lambda-ctm", type=float, default=None, help="CTM weight of the tarope+ctm variant (default 0.1)")
    parser.add_argument("--progress", action="store_true", help="print the training losses every 100 steps")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's result here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    task, budget = TaskConfig(), TrainBudget(steps=args.steps)
    variants = dict(VARIANTS)
    if args.lambda_ctm is not None:
        variants["tarope+ctm"] = replace(variants["tarope+ctm"], lambda_ctm=args.lambda_ctm)
    print(f"variants={[variants[n] for n in names]}", flush=True)
    print(f"task={task}\nbudget={budget}\nthreads={torch.get_num_threads()} torch={torch.__version__}", flush=True)

    results: list[RunResult] = []
    for seed in range(args.seeds):
        # Training clips depend on (seed, step) only, so every variant of a seed sees the same clips.
        test = generate(args.n_test, task, seed=20_000 + seed)
        for name in names:
            result = train_variant(variants[name], test, task, budget, seed, progress=args.progress)
            results.append(result)
            print(
                f"seed={seed} {name:11s} test_acc={result.test_accuracy:.3f} "
                f"final_ce={result.final_loss:.3f} ({result.seconds:.0f} s)",
                flush=True,
            )

    print(f"\n| variant | test accuracy (mean ± std, {args.seeds} seeds) | per-seed | final training CE | s / run |")
    print("|---|---|---|---|---|")
    for name in names:
        runs = [r for r in results if r.variant == name]
        acc = [r.test_accuracy for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        per_seed = ", ".join(f"{a:.3f}" for a in acc)
        final_ce = statistics.mean(r.final_loss for r in runs)
        secs = statistics.mean(r.seconds for r in runs)
        print(f"| {name} | {statistics.mean(acc):.3f} ± {std:.3f} | {per_seed} | {final_ce:.3f} | {secs:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
