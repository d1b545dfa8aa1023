"""Train every variant on the synthetic audio-visual synchrony task; report test accuracy.

Same clips, budget and seeds for every variant (see bench/alignment_task.py for
the task). Chance is 1/2.

    python bench/bench_alignment.py                       # all variants, 3 seeds, 1 thread
    python bench/bench_alignment.py --variants tarope,index --seeds 1 --steps 300
    python bench/bench_alignment.py --variants tarope+ctm-cosine,tarope --seed-list 3,4,5    # fresh seeds
    python bench/bench_alignment.py --variants tarope+ctm@1.0,tarope+ctm-encoder@0.01 --jobs 6   # lambda per variant, 6 processes

Runs are independent (fresh model, seeded clips), so ``--jobs N`` runs N of them at once, one
process and ``--threads`` threads each; the results do not depend on N.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.alignment_task import TASK_KINDS, VARIANTS, RunResult, TaskConfig, TrainBudget, Variant, generate, train_variant  # noqa: E402


def parse_variant(spec: str, lambda_ctm: float | None = None) -> Variant:
    """ "name" or "name@lambda" (a CTM weight for this row; the row is then named "name@lambda")."""
    name, _, lam = spec.partition("@")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r} in {spec!r}; known: {list(VARIANTS)}")
    variant = VARIANTS[name]
    if lam:
        try:
            return replace(variant, name=spec, lambda_ctm=float(lam))
        except ValueError:
            raise SystemExit(f"bad CTM weight {lam!r} in {spec!r}") from None
    if lambda_ctm is not None and variant.lambda_ctm > 0:
        return replace(variant, lambda_ctm=lambda_ctm)
    return variant


def parse_seeds(spec: str) -> list[int]:
    """ "3,4,5" -> [3, 4, 5]; distinct non-negative integers."""
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seed-list must be comma-separated integers, got {spec!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"--seed-list needs distinct non-negative seeds, got {spec!r}")
    return seeds


def _run(args: tuple[Variant, int, int, TaskConfig, TrainBudget, int, bool]) -> RunResult:
    variant, seed, n_test, task, budget, threads, progress = args
    torch.set_num_threads(threads)
    test = generate(n_test, task, seed=20_000 + seed)  # the same test clips for every variant of a seed
    result = train_variant(variant, test, task, budget, seed, progress=progress)
    print(
        f"seed={seed} {variant.name:11s} test_acc={result.test_accuracy:.3f} final_ce={result.final_loss:.3f} "
        f"steps_to_0.95={result.steps_to_95} ({result.seconds:.0f} s)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--task", default="synchrony", choices=TASK_KINDS, help="which task (bench/alignment_task.py)")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0 .. N-1")
    parser.add_argument("--seed-list", default=None, help="comma list of run seeds instead of --seeds, e.g. 3,4,5 (fresh seeds)")
    parser.add_argument("--steps", type=int, default=TrainBudget.steps)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lambda-ctm", type=float, default=None, help="CTM weight of the CTM variants without @lambda (default 0.1)")
    parser.add_argument(
        "--eval-every", type=int, default=TrainBudget.eval_every, help="test accuracy on --n-eval clips every this many steps"
    )
    parser.add_argument("--n-eval", type=int, default=TrainBudget.n_eval)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each")
    parser.add_argument("--progress", action="store_true", help="print the training losses every 100 steps")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's result here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    seeds = parse_seeds(args.seed_list) if args.seed_list else list(range(args.seeds))
    variants = [parse_variant(v.strip(), args.lambda_ctm) for v in args.variants.split(",") if v.strip()]
    names = [v.name for v in variants]
    task = TaskConfig(kind=args.task)
    budget = TrainBudget(steps=args.steps, eval_every=args.eval_every, n_eval=args.n_eval)
    print(f"variants={variants}", flush=True)
    print(f"task={task}\nbudget={budget}\nthreads={args.threads} jobs={args.jobs} torch={torch.__version__}", flush=True)

    # Training clips depend on (seed, step) only, so every variant of a seed sees the same clips.
    jobs = [(v, seed, args.n_test, task, budget, args.threads, args.progress) for seed in seeds for v in variants]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run, jobs))
    else:
        results = [_run(job) for job in jobs]

    print(
        f"\n| variant | test accuracy (mean ± std, seeds {','.join(map(str, seeds))}) | per-seed | steps to 0.95 (per seed) | final training CE | s / run |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        runs = [r for r in results if r.variant == name]
        acc = [r.test_accuracy for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        per_seed = ", ".join(f"{a:.3f}" for a in acc)
        final_ce = statistics.mean(r.final_loss for r in runs)
        secs = statistics.mean(r.seconds for r in runs)
        reach = ", ".join("-" if r.steps_to_95 is None else str(r.steps_to_95) for r in runs)
        print(f"| {name} | {statistics.mean(acc):.3f} ± {std:.3f} | {per_seed} | {reach} | {final_ce:.3f} | {secs:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
