"""``msata train`` on inner folds: each outer fold's validation speakers become the held-out speakers.

A refit (``train.refit``) trains on the validation speakers, so the outer validation speakers cannot say whether it
helps. One level down they can: for outer fold k (training speakers T_k, validation V_k, test Te_k), the inner fold
k trains on T_k less an inner validation draw from T_k (the split's val_fraction: 3 of 13 speakers at 0.2), chooses
on those, and tests on V_k. Te_k's clips are in no part of it. Run with ``train.refit = true`` and score with ``bench/refit_arms.py``: the pre-refit arm (the
model chosen on inner validation, with its probe) against the refit arm (trained on all of T_k), both on V_k.

Everything after the folds is msata's own ``train`` command, in this process, with its arguments and never registering
(``--register`` is refused):

    MSATA_HOME=HOME .venv/bin/python bench/nested_refit.py --store STORE --dataset ravdess --folds 5 --no-register \
        --config infra/configs/ravdess-whisper-base-speed-concat-chdrop-probe-geometric-refit.toml
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modeling.data.splits as sp  # noqa: E402

INNER_STREAM = 1  # the inner draw's generator is (split seed, fold, 1): no outer draw uses that key


def inner_folds(outer: list[sp.Fold], manifest: pd.DataFrame, config: sp.SplitConfig) -> list[sp.Fold]:
    """Per outer fold: train = its training speakers less an inner validation draw, test = its validation speakers."""
    folds = []
    for fold in outer:
        if not fold.val_speakers:
            raise SystemExit(f"outer fold {fold.index} has no validation speakers to hold out")
        rest = sorted(fold.train_speakers)
        val = sp._draw_val_speakers(rest, config, np.random.default_rng([config.seed, fold.index, INNER_STREAM]))
        train = sorted(set(rest) - set(val))
        folds.append(sp._fold_from_speakers(fold.index, manifest, train, val, list(fold.val_speakers)))
    return folds


def main() -> None:
    outer_make_folds = sp.make_folds

    def make_inner_folds(manifest: pd.DataFrame, config: sp.SplitConfig) -> list[sp.Fold]:
        return inner_folds(outer_make_folds(manifest, config), manifest, config)

    args = sys.argv[1:]
    if "--register" in args:  # its models are tested on validation speakers: never a registry version
        raise SystemExit("nested_refit: --register is refused; inner-fold models are for the nested check only")
    sp.make_folds = make_inner_folds  # prepare_experiment calls sp.make_folds; the spec then holds the inner folds
    from flows.cli import app

    app(["train", *args, "--no-register"], prog_name="nested_refit")


if __name__ == "__main__":
    main()
