"""One rank of a fold trained by several processes: ``torchrun ... -m modeling.training.fold_worker RUN_DIR FOLD``.

Launched by ``modeling.training.experiment.run_fold(..., nproc=N)`` (``msata train --nproc N``,
the flow parameter ``nproc``), which has already written the experiment spec, the run
logger's description (``run_logger.json``) and the fold's run id (``mlflow_run.json``, when
tracked) into the run directory: the worker rebuilds the logger from them. Every rank trains
its share; rank 0 writes the checkpoints, logs the fold's run, writes ``result.json`` and
prints the training events as ``MSATA_EVENT`` lines for the launching process's progress display.

It can also be run by hand on a prepared run directory (``msata train`` prints it in
its logs), e.g. on a host where the launch needs torchrun options of its own.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from modeling.training import distributed as dist
from modeling.training.experiment import RUN_FILE
from modeling.training.experiment_spec import load_spec
from modeling.training.fold_run import train_and_test_fold
from modeling.training.run_logger import load_run_logger
from modeling.training.train_loop import ProgressEvent, training_device


def _emit(event: ProgressEvent) -> None:
    data = asdict(event)
    dist.emit_event(data)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print(f"usage: torchrun --nproc-per-node N -m modeling.training.fold_worker RUN_DIR FOLD (got {argv!r})", file=sys.stderr)
        return 2
    run_dir, fold_index = Path(argv[0]), int(argv[1])
    spec = load_spec(run_dir)
    folds = spec.folds
    if not 0 <= fold_index < len(folds):
        raise ValueError(f"fold {fold_index} does not exist in {run_dir} (0..{len(folds) - 1})")
    fold_dir = run_dir / f"fold_{fold_index}"
    run_file = fold_dir / RUN_FILE
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.exists() else None
    logger = load_run_logger(run_dir)  # the one prepare_experiment recorded; one that tracks nothing ignores run_id
    ctx = dist.context_from_env()
    dist.start(ctx, training_device(spec.train, ctx))
    try:
        train_and_test_fold(spec, folds[fold_index], fold_dir, logger, run_id, _emit if ctx.is_main else None, ctx)
    finally:
        dist.stop(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
