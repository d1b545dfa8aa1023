"""2 gloo processes against 1 on CPU: wall time per epoch and agreement of weights and metrics.

Runs the script of tests/modeling/test_distributed.py (same tiny model, lambda_ctm 0, the
first epoch all warm-up) under torchrun on a tiny store of ``--speakers`` x ``--clips``
clips, then with ``--lambda-ctm`` > 0 to show the CTM term's per-rank averaging.

    .venv/bin/python bench/bench_ddp_cpu.py --speakers 6 --clips 12 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "modeling")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speakers", type=int, default=6)
    parser.add_argument("--clips", type=int, default=12, help="per speaker")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lambda-ctm", type=float, default=0.1)
    args = parser.parse_args()

    import test_distributed as t
    from training_fixtures import build_tiny_store

    from modeling.training.checkpoint import load_checkpoint

    root = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    build_tiny_store(root / "store", n_speakers=args.speakers, clips_per_speaker=args.clips)
    for lambda_ctm in (0.0, args.lambda_ctm):
        config = t.CONFIG | {"lambda_ctm": lambda_ctm}
        script = root / f"script_{lambda_ctm}.py"
        script.write_text(t.SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), store=str(root / "store"), config=config))
        runs = {n: t.run(script, root / f"l{lambda_ctm}_n{n}", nproc=n, epochs=args.epochs) for n in (1, 2)}
        wa, wb = (load_checkpoint(root / f"l{lambda_ctm}_n{n}" / "last.pt")["state_dict"] for n in (1, 2))
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa if k not in t.CANCELLED)
        print(
            json.dumps(
                {
                    "lambda_ctm": lambda_ctm,
                    "epoch_s": {n: [round(r["seconds"], 2) for r in runs[n]["history"]] for n in runs},
                    "val_uar": {n: [round(r["val_uar"], 4) for r in runs[n]["history"]] for n in runs},
                    "train_loss": {n: [round(r["train_loss"], 6) for r in runs[n]["history"]] for n in runs},
                    "max_weight_diff": worst,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
